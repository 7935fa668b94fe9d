"""e2e: qemu-amd64 through OVMF (UEFI) + systemd-boot on a vfat ESP: the x86-mini boot path.

Costs: cold ~5 min (native mmdebstrap), warm build ~1 min, boot ~100 s (TCG; /dev/kvm is not
usable here).
"""
import time
from pathlib import Path

import pytest

from appliance.image.boot import READY_MARKER, start
from appliance.image.inspect import partitions

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]
REPO = Path(__file__).resolve().parents[2]


def test_uefi_image_boots_to_ready_with_erofs_root(tmp_path):
    from appliance.image.build import build
    from appliance.image.config import make_config

    # The boot path is under test here, not the agent (test_e2e_agent.py covers that on arm64).
    cfg = make_config("qemu-amd64", profile="debug", out_dir=tmp_path / "out", boards_dir=REPO / "boards",
                      with_agent=False)
    res = build(cfg)
    parts = {p["name"]: p for p in partitions(res.image)}
    assert parts["boot"]["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"  # an ESP firmware can find
    t0 = time.monotonic()
    with start(res.image, log_path=tmp_path / "console.log") as vm:
        vm.expect(r"BdsDxe: starting", 120)                       # OVMF picked the disk
        vm.expect(READY_MARKER + r" board=qemu-amd64", 900)
        ready = time.monotonic() - t0
        vm.send("\n")
        vm.expect(r"root@qemu-amd64:[^\n]*# ", 120)
        rc, out = vm.run("findmnt -no FSTYPE,OPTIONS /")
        assert rc == 0 and out.split()[0] == "erofs" and "ro" in out.split()[1].split(",")
        rc, out = vm.run("systemctl is-system-running --wait", timeout=180)
        failed = vm.run("systemctl --failed --no-legend")[1]
        assert out.strip() == "running", f"state {out.strip()}; failed: {failed}"
    print(f"amd64 boot to {READY_MARKER}: {ready:.1f} s")
