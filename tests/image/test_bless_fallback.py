"""The sh fallback behind appliance-update-bless.service (ExecStopPost): when mark-good could not
run to a decision (the agent binary cannot start, or it hung), reboot only if the other slot can
boot; otherwise stay up. Run for real with /bin/sh, on a boot "partition" that is a directory
(as appliance.secure.slots.mounted_boot accepts in tests) and a reboot command that leaves a mark.
tests/image/test_e2e_bless_fallback.py boots the same on qemu-arm64 with a broken agent."""
import os
import pathlib
import subprocess

import pytest

from appliance.image.config import make_config
from appliance.image.customise import template_context
from appliance.image.templates_render import render_tree

B = pathlib.Path(__file__).resolve().parents[2] / "boards"


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    c = make_config("qemu-arm64", boards_dir=B, profile="production")
    render_tree("rootfs", root, template_context(c, {"name": c.image_name}, agent=True))
    unit = (root / "etc/systemd/system/appliance-update-bless.service").read_text()
    assert "ExecStopPost=/bin/sh /usr/lib/appliance/bless-fallback.sh" in unit
    return root / "usr/lib/appliance/bless-fallback.sh"


def run(script, tmp_path, *, state, slot="a", result="exit-code", code="exited", status="203"):
    boot = tmp_path / "boot"
    boot.mkdir(exist_ok=True)
    if state is not None:
        (boot / "bootstate.env").write_text(state)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"root=PARTLABEL=root-{slot} ro" + (f" appliance.slot={slot}" if slot else "") + " quiet\n")
    mark = tmp_path / "rebooted"
    env = {"PATH": os.environ["PATH"], "SERVICE_RESULT": result, "EXIT_CODE": code, "EXIT_STATUS": status,
           "APPLIANCE_CMDLINE": str(cmdline), "APPLIANCE_BOOT": str(boot), "APPLIANCE_BOOT_LOCK": str(tmp_path / "run" / "boot.lock"),
           "APPLIANCE_CONSOLE": str(tmp_path / "console"), "APPLIANCE_REBOOT": f"touch {mark}"}
    r = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return mark.exists(), r.stdout


TWO_SLOTS = "BOOT_ORDER=a b\nBOOT_a_LEFT=2\nBOOT_b_LEFT=3\n"


@pytest.mark.parametrize("result,code,status", [
    ("exit-code", "exited", "203"),     # systemd could not exec the agent
    ("exit-code", "exited", "255"),     # the PyInstaller bootloader gave up
    ("signal", "killed", "BUS"),        # a page of the binary failed verity
    ("timeout", "killed", "TERM"),      # mark-good hung past TimeoutStartSec
])
def test_agent_failure_with_a_bootable_other_slot_reboots(script, tmp_path, result, code, status):
    rebooted, out = run(script, tmp_path, state=TWO_SLOTS, result=result, code=code, status=status)
    assert rebooted and "slot b can boot (3 tries): rebooting to give up slot a" in out
    assert out in (tmp_path / "console").read_text()


def test_booted_b_looks_at_a(script, tmp_path):
    rebooted, out = run(script, tmp_path, state="BOOT_ORDER=b a\nBOOT_a_LEFT=3\nBOOT_b_LEFT=2\n", slot="b")
    assert rebooted and "slot a can boot" in out


@pytest.mark.parametrize("state,slot,why", [
    ("BOOT_ORDER=a\nBOOT_a_LEFT=3\nBOOT_b_LEFT=0\n", "a", "slot b cannot boot"),   # factory-fresh: one slot
    ("BOOT_ORDER=a b\nBOOT_a_LEFT=3\nBOOT_b_LEFT=0\n", "a", "slot b cannot boot"),  # b used up its tries
    ("BOOT_ORDER=a\nBOOT_a_LEFT=3\nBOOT_b_LEFT=3\n", "a", "slot b cannot boot"),   # b taken out (install running)
    (None, "a", "slot b cannot boot"),                                             # no state file
    ("BOOT_ORDER=a b\nBOOT_a_LEFT=3\nBOOT_b_LEFT=x\n", "a", "slot b cannot boot"),  # garbage
    (TWO_SLOTS, "", "not booted from an A/B slot"),
])
def test_stays_up_when_no_other_slot_can_boot(script, tmp_path, state, slot, why):
    rebooted, out = run(script, tmp_path, state=state, slot=slot)
    assert not rebooted and why in out and "staying up" in out


@pytest.mark.parametrize("result,code,status", [("success", "exited", "0"), ("exit-code", "exited", "1")])
def test_mark_good_decisions_are_left_alone(script, tmp_path, result, code, status):
    rebooted, out = run(script, tmp_path, state=TWO_SLOTS, result=result, code=code, status=status)
    assert not rebooted and out == ""
