"""e2e: a boot that cannot reach multi-user never leaves a device sitting in emergency mode.

The trigger is a data partition that lost its filesystem (every byte zeroed, as a worn-out or
wiped card gives): data.mount fails, local-fs.target fails and systemd starts emergency.service.
- production: no shell (root is locked, nobody is at the console); the device says why on the
  console and reboots, and boot.scr's counter shows the slot spent one more try.
- debug: the developer at the console gets a root shell in emergency mode and nothing reboots.
About 2 min per boot under TCG.
"""
import subprocess
import time

import pytest

from appliance.image.boot import start
from appliance.image.inspect import partitions

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def _wiped_data(image, dst):
    subprocess.run(["cp", "--sparse=always", str(image), str(dst)], check=True)
    d = next(p for p in partitions(dst) if p["name"] == "data")
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(d["start"] * 512),
                    "--length", str(d["size"] * 512), str(dst)], check=True)
    return dst


def test_production_reboots_out_of_emergency_mode(qemu_arm64_production, tmp_path):
    cfg, res = qemu_arm64_production
    card = _wiped_data(res.image, tmp_path / "wiped.img")
    with start(card, board=cfg.board, log_path=tmp_path / "console.log", reboot=True) as vm:
        vm.expect(r"appliance: booting slot a \(order a, tries left a=2 b=0\)", 300)
        vm.expect(r"Failed to mount[^\n]*data\.mount", 600)
        vm.expect(r"appliance: emergency mode \(see the errors above\): rebooting in 10 s", 300)
        # The reboot reaches U-Boot again, which takes the next try of slot a.
        vm.expect(r"appliance: booting slot a \(order a, tries left a=1 b=0\)", 300)
    text = (tmp_path / "console.log").read_text(errors="replace")
    assert "Press Enter for system maintenance" not in text and "root account is locked" not in text


def test_debug_gives_a_shell_in_emergency_mode(qemu_arm64_debug, tmp_path):
    cfg, res = qemu_arm64_debug
    card = _wiped_data(res.image, tmp_path / "wiped.img")
    # -no-reboot: a reboot would end QEMU, which the checks below would see.
    with start(card, board=cfg.board, log_path=tmp_path / "console.log") as vm:
        vm.expect(r"You are in emergency mode", 900)
        vm.expect(r"Control-D to continue\): ", 60)
        time.sleep(2)               # sulogin flushes the console's input when it starts
        vm.send("\n")
        vm.expect(r"root@qemu-arm64:[^\n]*# ", 60)
        rc, out = vm.run("systemctl is-system-running; systemctl is-failed data.mount", 120)
        assert out.split()[-2:] == ["maintenance", "failed"], out
        time.sleep(20)
        assert vm.proc.poll() is None, "the debug image rebooted out of emergency mode"
        rc, out = vm.run("echo still-here", 60)
        assert rc == 0 and "still-here" in out
