"""e2e: a slot whose agent cannot run is still given up when another slot can boot.

mark-good (appliance-update-bless.service) is the agent itself, so a broken bundle used to leave
the device up, unblessed, for good. Here one byte of /opt/appliance/appliance-agent/appliance-agent
is flipped in root-a (dm-verity then fails that block: the executable cannot start) and the
debug image boots under QEMU twice:
- with bootstate.env saying slot b can boot (order "a b", 3 tries each): the sh fallback
  (ExecStopPost) reboots, and U-Boot takes slot a's next try;
- factory-fresh (slot a alone): it says it stays up, and it does.
About 3 min per boot under TCG.
"""
import re
import subprocess

import pytest

from appliance.image.boot import READY_MARKER, start
from appliance.image.inspect import partitions

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
AGENT = "/opt/appliance/appliance-agent/appliance-agent"


def _broken_agent_card(res, tmp_path, bootstate: str | None):
    parts = {p["name"]: p for p in partitions(res.image)}
    verity = res.manifest_data["root"]["verity"]
    root_fs = tmp_path / "root-a.erofs"
    subprocess.run(["dd", f"if={res.image}", f"of={root_fs}", "bs=512", f"skip={parts['root-a']['start']}",
                    f"count={verity['hash_offset'] // 512}", "status=none"], check=True)
    out = subprocess.run(["dump.erofs", f"--path={AGENT}", "-e", str(root_fs)], capture_output=True,
                         text=True, check=True).stdout
    root_fs.unlink()
    # Extent lines: "  1:     9102..   15208 |    6106 :   45101056..  45105152 |    4096"
    extents = [int(m.group(1)) for m in re.finditer(r"^\s*\d+:\s+\d+\.\.\s+\d+ \|\s+\d+ :\s+(\d+)\.\.", out, re.M)]
    assert len(extents) > 2, out
    card = tmp_path / "card.img"
    subprocess.run(["cp", "--sparse=always", str(res.image), str(card)], check=True)
    with open(card, "r+b") as f:
        off = parts["root-a"]["start"] * 512 + extents[1] + 100     # the executable's 2nd block
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ 0x5A]))
    if bootstate is not None:
        src = tmp_path / "bootstate.env"
        src.write_text(bootstate)
        subprocess.run(["mcopy", "-o", "-i", f"{card}@@{parts['boot']['start'] * 512}", str(src),
                        "::bootstate.env"], check=True)
    return card


def test_broken_agent_with_a_bootable_slot_b_reboots(qemu_arm64_debug, tmp_path):
    cfg, res = qemu_arm64_debug
    card = _broken_agent_card(res, tmp_path, "BOOT_ORDER=a b\nBOOT_a_LEFT=3\nBOOT_b_LEFT=3\n")
    with start(card, board=cfg.board, log_path=tmp_path / "console.log", reboot=True) as vm:
        vm.expect(r"appliance: booting slot a \(order a b, tries left a=2 b=3\)", 300)
        vm.expect(r"appliance-bless-fallback: mark-good did not run to a decision [^\n]*; slot b can boot "
                  r"\(3 tries\): rebooting to give up slot a", 1200)
        vm.expect(r"appliance: booting slot a \(order a b, tries left a=1 b=3\)", 600)


def test_broken_agent_on_a_single_slot_stays_up(qemu_arm64_debug, tmp_path):
    cfg, res = qemu_arm64_debug
    card = _broken_agent_card(res, tmp_path, None)      # factory-fresh: BOOT_ORDER=a
    with start(card, board=cfg.board, log_path=tmp_path / "console.log") as vm:   # -no-reboot
        vm.expect(READY_MARKER, 1200)
        vm.expect(r"appliance-bless-fallback: [^\n]*slot b cannot boot [^\n]*: staying up on slot a", 600)
        vm.send("\n")
        vm.expect(r"root@qemu-arm64:[^\n]*# ", 120)
        rc, out = vm.run("systemctl is-failed appliance-update-bless.service; echo alive", 120)
        assert "failed" in out and "alive" in out, out
        assert vm.proc.poll() is None
