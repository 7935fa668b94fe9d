"""flash --via uboot-ums and --via rockusb.

uboot-ums: the U-Boot side is real (Debian's u-boot-qemu in QEMU, over socket://), but
QEMU's virt board has no USB gadget, so `ums` cannot export storage here: the test gives
U-Boot a stand-in long-running command (`sleep`, interruptible by Ctrl-C like `ums`) and
makes the "board's disk" appear as a loop device, a real block device node.

rockusb: no RK3588 board can exist here; a stand-in `rkdeveloptool` script on PATH
implements the tool's ld/db/wl/rl/rd commands over a file, so the driving and the
read-back verification are exercised. The missing-tool error is tested for real."""

import os
import subprocess
import threading
import time

import pytest

from appliance.provision.cli import main
from appliance.provision.qemu import QemuBoard

MiB = 1 << 20


def test_uboot_ums_flashes_the_appearing_device_and_resets(kit, tmp_path, capsys):
    image = kit.make_image(tmp_path)
    backing = kit.blank_card(tmp_path / "emmc", 20 * MiB)
    link = tmp_path / "usb-board-disk"
    board = QemuBoard()
    board.start()
    attached = []

    def plug_in():  # the host sees the board's disk a moment after ums starts
        time.sleep(1.5)
        dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                             text=True, check=True).stdout.strip()
        attached.append(dev)
        link.symlink_to(dev)

    t = threading.Thread(target=plug_in, daemon=True)
    t.start()
    try:
        rc = main(["flash", str(image), "--via", "uboot-ums", "--console",
                   f"socket://127.0.0.1:{board.port}", "--to", str(link),
                   "--ums-command", "echo UMS: LUN 0 stand-in; sleep 120",
                   "--log", str(tmp_path / "ums.log"), "--appear-timeout", "30"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert "through U-Boot ums; verified" in out
    finally:
        t.join(10)
        board.stop()
        for dev in attached:
            subprocess.run(["losetup", "-d", dev], check=False)
    with open(image, "rb") as a, open(backing, "rb") as b:
        assert a.read() == b.read(16 * MiB)
    log = (tmp_path / "ums.log").read_text()
    assert "UMS: LUN 0 stand-in" in log
    # reset happened after ums was stopped: a second U-Boot banner
    assert log.count("U-Boot 2023.01") >= 2


def test_uboot_ums_device_never_appears(kit, tmp_path, capsys):
    image = kit.make_image(tmp_path)
    board = QemuBoard()
    board.start()
    try:
        rc = main(["flash", str(image), "--via", "uboot-ums", "--console",
                   f"socket://127.0.0.1:{board.port}", "--to", str(tmp_path / "nothing"),
                   "--ums-command", "sleep 120", "--log", str(tmp_path / "u.log"),
                   "--appear-timeout", "2"])
    finally:
        board.stop()
    err = capsys.readouterr().err
    assert rc == 1 and "did not appear within 2 s" in err and len(err.strip().splitlines()) == 1


def test_rockusb_missing_tool(kit, tmp_path, capsys, monkeypatch):
    image = kit.make_image(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["flash", str(image), "--via", "rockusb", "--yes"]) == 1
    assert "rkdeveloptool not found in PATH" in capsys.readouterr().err


FAKE_RKDEVELOPTOOL = r'''#!/bin/sh
# stand-in for rkdeveloptool over a file "storage" ($RK_DISK); see the module docstring
case "$1" in
  ld) echo "DevNo=1 Vid=0x2207,Pid=0x350b,LocationID=101 Maskrom" ;;
  db) [ -f "$2" ] && echo "Downloading bootloader succeeded." || echo "Downloading bootloader failed." ;;
  wl) dd if="$3" of="$RK_DISK" bs=512 seek="$2" conv=notrunc status=none && echo "Write LBA from file (100%)"
      if [ -n "$RK_CORRUPT_AT" ]; then
        printf 'X' | dd of="$RK_DISK" bs=1 seek="$RK_CORRUPT_AT" conv=notrunc status=none
      fi ;;
  rl) dd if="$RK_DISK" of="$4" bs=512 skip="$2" count="$3" status=none && echo "Read LBA to file (100%)" ;;
  rd) echo "Reset Device OK." ;;
  *) echo "unknown command failed"; exit 1 ;;
esac
'''


@pytest.fixture
def fake_rk(kit, tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "rkdeveloptool"
    tool.write_text(FAKE_RKDEVELOPTOOL)
    tool.chmod(0o755)
    disk = kit.blank_card(tmp_path / "rk-emmc", 32 * MiB)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("RK_DISK", str(disk))
    loader = tmp_path / "rk3588_spl_loader.bin"
    loader.write_bytes(b"loader")
    return disk, loader


def test_rockusb_drives_the_tool_and_verifies(kit, tmp_path, fake_rk, capsys, monkeypatch):
    disk, loader = fake_rk
    image = kit.make_image(tmp_path)
    assert main(["flash", str(image), "--via", "rockusb"]) == 1
    assert "pass --yes" in capsys.readouterr().err
    assert main(["flash", str(image), "--via", "rockusb", "--yes"]) == 1
    assert "pass --loader" in capsys.readouterr().err
    assert main(["flash", str(image), "--via", "rockusb", "--yes", "--loader", str(loader)]) == 0
    with open(image, "rb") as a, open(disk, "rb") as b:
        assert a.read() == b.read(16 * MiB)
    monkeypatch.setenv("RK_CORRUPT_AT", str(6 * MiB + 5))
    assert main(["flash", str(image), "--via", "rockusb", "--yes", "--loader", str(loader)]) == 1
    assert "rockusb: verification failed: blocks" in capsys.readouterr().err
