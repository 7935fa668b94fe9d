"""What image/harden.py plans and does, on small root trees (fast; the booted image is checked
in test_e2e_access.py). `systemctl --root` is the real one, on the test tree."""
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from appliance.image.harden import (COMPILER_GLOBS, NOT_COMPILERS, PACKAGE_MANAGER_GLOBS, harden,
                                    lock_password_fields, match_paths, plan_harden)

SHADOW = ("root:$y$j9T$abc$def:20454:0:99999:7:::\n"
          "daemon:*:20454:0:99999:7:::\n"
          "op:!$6$xyz:20454:0:99999:7:::\n"
          "nopw::20454:0:99999:7:::\n"
          "# a comment\n")
PASSWD = ("root:x:0:0:root:/root:/bin/bash\n"
          "legacy:$1$salt$hash:1000:1000::/home/legacy:/bin/sh\n"
          "empty::1001:1001::/:/bin/sh\n")

UNIT = "[Unit]\nDescription={name}\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy={wanted}\n"


def make_root(root: Path) -> Path:
    files = {
        "usr/bin/apt": "", "usr/bin/apt-get": "", "usr/bin/apt-cache": "", "usr/bin/dpkg": "",
        "usr/bin/dpkg-query": "", "usr/sbin/dpkg-reconfigure": "", "usr/lib/apt/methods/http": "",
        "usr/lib/dpkg/methods/x": "", "usr/lib/aarch64-linux-gnu/libapt-pkg.so.7.0": "",
        "var/lib/dpkg/status": "Package: base-files\n", "var/lib/apt/lists/x": "", "var/cache/apt/archives/y.deb": "",
        "etc/apt/sources.list": "", "etc/dpkg/dpkg.cfg": "", "etc/cron.daily/dpkg": "",
        "usr/bin/ld.so": "", "usr/bin/ldd": "", "usr/sbin/ldconfig": "", "usr/bin/perl": "",
        "usr/bin/gcc-14": "", "usr/bin/aarch64-linux-gnu-gcc-14": "", "usr/bin/aarch64-linux-gnu-ld.bfd": "",
        "usr/bin/as": "", "usr/lib/gcc/aarch64-linux-gnu/14/cc1": "",
        "usr/lib/aarch64-linux-gnu/libgcc_s.so.1": "",
        "etc/shadow": SHADOW, "etc/passwd": PASSWD,
        "usr/lib/systemd/system/apt-daily.timer": UNIT.format(name="apt", wanted="timers.target"),
        "usr/lib/systemd/system/apt-daily.service": UNIT.format(name="apt", wanted="multi-user.target"),
        "usr/lib/systemd/system/dpkg-db-backup.timer": UNIT.format(name="dpkg", wanted="timers.target"),
        "usr/lib/systemd/system/nftables.service": UNIT.format(name="nft", wanted="sysinit.target"),
        "etc/systemd/system/appliance-machine-id.service": UNIT.format(name="mid", wanted="sysinit.target"),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    os.chmod(root / "etc/shadow", 0o640)
    (root / "usr/bin/cc").symlink_to("/etc/alternatives/cc")       # dangling in the tree: still a compiler
    (root / "usr/bin/gcc").symlink_to("gcc-14")
    wants = root / "etc/systemd/system/timers.target.wants"
    wants.mkdir(parents=True)
    (wants / "apt-daily.timer").symlink_to("/lib/systemd/system/apt-daily.timer")
    (wants / "dpkg-db-backup.timer").symlink_to("/lib/systemd/system/dpkg-db-backup.timer")
    (root / "lib").symlink_to("usr/lib")
    return root


def test_password_fields_are_locked_and_the_rest_kept():
    new, users = lock_password_fields(SHADOW)
    assert users == ["root", "nopw"]
    lines = new.splitlines()
    assert lines[0] == "root:*:20454:0:99999:7:::"
    assert lines[1:3] == SHADOW.splitlines()[1:3]         # '*' and '!...' are already locked
    assert lines[3] == "nopw:*:20454:0:99999:7:::"       # empty = no password at all
    assert lines[4] == "# a comment"
    new, users = lock_password_fields(PASSWD)
    assert users == ["legacy", "empty"] and new.splitlines()[0] == PASSWD.splitlines()[0]


def test_production_plan(tmp_path):
    root = make_root(tmp_path / "root")
    plan = plan_harden("production", root)
    assert "serial-getty@.service" in plan.mask and "getty@.service" in plan.mask
    assert set(plan.disable) == {"apt-daily.timer", "dpkg-db-backup.timer"}
    assert plan.compilers == sorted(["usr/bin/cc", "usr/bin/gcc", "usr/bin/gcc-14", "usr/bin/as",
                                     "usr/bin/aarch64-linux-gnu-gcc-14", "usr/bin/aarch64-linux-gnu-ld.bfd",
                                     "usr/lib/gcc"])
    for rel in ("usr/bin/apt", "usr/bin/apt-get", "usr/bin/dpkg", "usr/bin/dpkg-query", "usr/sbin/dpkg-reconfigure",
                "var/lib/dpkg", "var/lib/apt", "var/cache/apt", "etc/apt", "usr/lib/apt",
                "usr/lib/aarch64-linux-gnu/libapt-pkg.so.7.0", "usr/lib/systemd/system/apt-daily.timer"):
        assert rel in plan.remove, rel
    # The C library's loader tools, a Perl and libgcc are not a toolchain.
    for rel in ("usr/bin/ld.so", "usr/bin/ldd", "usr/sbin/ldconfig", "usr/bin/perl",
                "usr/lib/aarch64-linux-gnu/libgcc_s.so.1"):
        assert rel not in plan.remove, rel
    assert "var/lib/dpkg/status" not in plan.remove          # goes with its directory
    assert set(plan.rewrite) == {"etc/shadow", "etc/passwd"}
    assert plan.locked_users == ["root", "nopw", "legacy", "empty"]


def test_debug_plan_keeps_tools_and_consoles_but_locks_passwords(tmp_path):
    root = make_root(tmp_path / "root")
    plan = plan_harden("debug", root)
    assert plan.mask == [] and plan.remove == [] and plan.disable == []
    assert "etc/shadow" in plan.rewrite and "nftables.service" in plan.enable


def test_match_paths_does_not_follow_symlinked_directories(tmp_path):
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "bin").mkdir(parents=True)
    (outside / "bin" / "gcc").write_text("")
    (root / "usr" / "bin").symlink_to(outside / "bin")
    assert match_paths(root, COMPILER_GLOBS, NOT_COMPILERS) == []


def test_harden_on_a_hardlink_copy_leaves_the_cache_alone(tmp_path):
    cache = make_root(tmp_path / "cache")
    before = {p.relative_to(cache).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
              for p in cache.rglob("*")}
    root = tmp_path / "image"
    subprocess.run(["cp", "-al", str(cache), str(root)], check=True)
    changed = harden(SimpleNamespace(profile="production"), root)
    assert changed == ["etc/passwd", "etc/shadow"]
    # the image: no package manager, no toolchain, passwords locked, units wired
    assert match_paths(root, COMPILER_GLOBS + PACKAGE_MANAGER_GLOBS, NOT_COMPILERS) == []
    assert (root / "usr/bin/ld.so").exists() and (root / "usr/bin/perl").exists()
    assert (root / "etc/shadow").read_text().splitlines()[0].split(":")[1] == "*"
    assert oct((root / "etc/shadow").stat().st_mode & 0o777) == "0o640"
    assert not list((root / "etc/systemd/system/timers.target.wants").glob("*"))
    assert os.readlink(root / "etc/systemd/system/serial-getty@.service") == "/dev/null"
    assert (root / "etc/systemd/system/sysinit.target.wants/nftables.service").is_symlink()
    assert (root / "etc/systemd/system/sysinit.target.wants/appliance-machine-id.service").is_symlink()
    # the cache: every file still there with its old content (shadow kept its hash)
    after = {p.relative_to(cache).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
             for p in cache.rglob("*")}
    assert after == before
    assert "$y$" in (cache / "etc/shadow").read_text()


def test_harden_refuses_a_toolchain_it_could_not_remove(tmp_path, monkeypatch):
    root = make_root(tmp_path / "root")
    import appliance.image.harden as h

    monkeypatch.setattr(h, "_remove", lambda p: None)   # removal "failed": the final check must say so
    with pytest.raises(h.BuildError, match="still has"):
        harden(SimpleNamespace(profile="production"), root)


@pytest.mark.parametrize("with_ca, agent", [(True, True), (False, False)])
def test_access_templates(tmp_path, with_ca, agent):
    """sshd trusts the --ssh-ca key only when one was given; the firewall opens the runtime's
    port only when the image carries the agent."""
    from appliance.image.config import make_config
    from appliance.image.customise import RUNTIME_PORT, template_context
    from appliance.image.templates_render import render_tree

    ca = None
    if with_ca:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ca", "-f", str(tmp_path / "ca")],
                       check=True)
        ca = tmp_path / "ca.pub"
    cfg = make_config("qemu-arm64", out_dir=tmp_path / "out", ssh_ca=ca,
                      boards_dir=Path(__file__).resolve().parents[2] / "boards")
    root = tmp_path / "root"
    written = render_tree("rootfs", root, template_context(cfg, {}, agent=agent))
    sshd = (root / "etc/ssh/sshd_config.d/appliance.conf").read_text()
    assert "AuthorizedKeysFile none" in sshd and "PasswordAuthentication no" in sshd
    assert ("TrustedUserCAKeys /etc/ssh/appliance-user-ca.pub" in sshd) == with_ca
    assert ("etc/ssh/appliance-user-ca.pub" in written) == with_ca
    if with_ca:
        assert (root / "etc/ssh/appliance-user-ca.pub").read_text().strip() == ca.read_text().strip()
    nft = (root / "etc/nftables.conf").read_text()
    assert "policy drop;" in nft and "tcp dport 22 accept" in nft
    assert (f"tcp dport {RUNTIME_PORT} accept" in nft) == agent
    assert "RuntimeWatchdogSec=30s" in (root / "etc/systemd/system.conf.d/appliance-watchdog.conf").read_text()
