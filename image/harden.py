"""Profile-dependent lock-down of the customised root (issue 3: access and hardened defaults).

Runs last in `customise`, on the hard-link copy of the cached base: anything it changes it must
replace (unlink, then create), never write into, or the base cache changes too. Removing a
path only drops the copy's directory entry, so the cache keeps its files.

Split like the rest of the build: `plan_harden` looks at a root and says what to do (pure,
unit-tested on small trees), `harden` does it.

Every profile: no password anywhere (every /etc/shadow and /etc/passwd password field locked),
nftables and the machine-id keeper enabled. Production also: no login prompt (every getty
masked), no package manager (apt and dpkg tools, their databases, caches and timers) and no
compiler or assembler/linker. The manifest's package list was taken from the base before this
runs, so the SBOM still lists what was installed.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .config import BuildConfig
from .errors import BuildError

# Production images have no login prompt anywhere.
UNITS_MASKED_PRODUCTION = ("serial-getty@.service", "getty@.service", "console-getty.service")
# Enabled on every profile; nftables.conf and appliance-machine-id.service are our templates.
UNITS_ENABLED = ("nftables.service", "appliance-machine-id.service")
# Timers that run apt/dpkg: disabled before their binaries go, or they fail every day.
UNITS_PACKAGE_MANAGER = ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer")

# Globs relative to the root. Tools, their state and their own plumbing; libapt-pkg has no
# other user once apt is gone.
PACKAGE_MANAGER_GLOBS = (
    "usr/bin/apt", "usr/bin/apt-*", "usr/bin/dpkg", "usr/bin/dpkg-*", "usr/sbin/dpkg-*",
    "usr/bin/debconf-apt-progress",
    "usr/lib/apt", "usr/lib/dpkg", "usr/share/dpkg",
    "usr/lib/*-linux-gnu*/libapt-*.so*",
    "var/lib/dpkg", "var/lib/apt", "var/cache/apt", "var/cache/debconf", "var/log/apt", "var/log/dpkg.log",
    "etc/apt", "etc/dpkg", "etc/cron.daily/apt-compat", "etc/cron.daily/dpkg",
    "usr/lib/systemd/system/apt-daily*", "usr/lib/systemd/system/dpkg-db-backup.*",
    "usr/share/bash-completion/completions/apt*", "usr/share/bash-completion/completions/dpkg*",
)
# Compiler drivers, assemblers and linkers, plain and target-prefixed, and GCC's back ends.
# Not ld.so/ldd/ldconfig: those are the C library's dynamic loader tools.
COMPILER_GLOBS = (
    "usr/bin/cc", "usr/bin/c++", "usr/bin/c89", "usr/bin/c99", "usr/bin/gcc", "usr/bin/gcc-*",
    "usr/bin/g++", "usr/bin/g++-*", "usr/bin/cpp", "usr/bin/cpp-*", "usr/bin/clang", "usr/bin/clang-*",
    "usr/bin/clang++*", "usr/bin/tcc", "usr/bin/as", "usr/bin/ld", "usr/bin/ld.bfd", "usr/bin/ld.gold",
    "usr/bin/ld.lld", "usr/bin/lld", "usr/bin/gold",
    "usr/bin/*-linux-gnu*-gcc*", "usr/bin/*-linux-gnu*-g++*", "usr/bin/*-linux-gnu*-cpp*",
    "usr/bin/*-linux-gnu*-as", "usr/bin/*-linux-gnu*-ld", "usr/bin/*-linux-gnu*-ld.*",
    "usr/lib/gcc", "usr/libexec/gcc", "usr/lib/gcc-cross",
)
NOT_COMPILERS = ("ld.so", "ldd", "ldconfig")
# A password field that lets nobody in: '*' (never had one), '!...' (locked), 'x' (see shadow).
LOCKED = "*"


@dataclass
class HardenPlan:
    mask: list[str] = field(default_factory=list)
    enable: list[str] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)       # relative paths, files or trees
    compilers: list[str] = field(default_factory=list)    # the part of `remove` that is a toolchain
    # relative path -> new text, for files whose password fields must be locked
    rewrite: dict[str, str] = field(default_factory=dict)
    locked_users: list[str] = field(default_factory=list)


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def match_paths(root: Path, globs: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[str]:
    """Relative paths under ROOT matching any glob (each glob component matched in its
    directory, so a pattern never walks the whole tree). Symlinks count, dangling or not."""
    found: set[str] = set()
    for g in globs:
        parts = g.split("/")
        level = [root]
        for i, part in enumerate(parts):
            nxt = []
            for d in level:
                if any(c in part for c in "*?["):
                    if not d.is_dir() or d.is_symlink():
                        continue
                    nxt += [d / n for n in sorted(os.listdir(d)) if fnmatch.fnmatchcase(n, part)]
                elif _exists(d / part):
                    nxt.append(d / part)
            # Intermediate components must be real directories (not symlinks out of the root).
            level = nxt if i == len(parts) - 1 else [p for p in nxt if p.is_dir() and not p.is_symlink()]
        found.update(p.relative_to(root).as_posix() for p in level)
    out = sorted(r for r in found if r.rsplit("/", 1)[-1] not in exclude)
    # A path inside one already listed goes with its parent.
    return [r for r in out if not any(r.startswith(o + "/") for o in out if o != r)]


def lock_password_fields(text: str, field_index: int = 1) -> tuple[str, list[str]]:
    """Lock every account's password field in passwd/shadow-style TEXT.

    Shadow (field 1): anything but '*' or '!...' becomes '*' (a hash could be cracked, an
    empty field means no password at all). Passwd: anything but 'x' (look in shadow), '*' or
    '!...' becomes '*'. Returns (new text, users changed); comments and odd lines are kept."""
    out, changed = [], []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        fields = body.split(":")
        if body.startswith("#") or len(fields) <= field_index:
            out.append(line)
            continue
        pw = fields[field_index]
        if pw in ("x", "*") or pw.startswith("!"):
            out.append(line)
            continue
        fields[field_index] = LOCKED
        changed.append(fields[0])
        out.append(":".join(fields) + line[len(body):])
    return "".join(out), changed


def plan_harden(profile: str, root: Path) -> HardenPlan:
    plan = HardenPlan(enable=list(UNITS_ENABLED))
    for rel in ("etc/shadow", "etc/passwd"):
        p = root / rel
        if p.is_file():
            new, users = lock_password_fields(p.read_text())
            if users:
                plan.rewrite[rel] = new
                plan.locked_users += [u for u in users if u not in plan.locked_users]
    if profile == "production":
        plan.mask = list(UNITS_MASKED_PRODUCTION)
        plan.disable = [u for u in UNITS_PACKAGE_MANAGER
                        if _exists(root / "usr/lib/systemd/system" / u) or _exists(root / "lib/systemd/system" / u)]
        plan.compilers = match_paths(root, COMPILER_GLOBS, NOT_COMPILERS)
        pm = match_paths(root, PACKAGE_MANAGER_GLOBS)
        plan.remove = sorted(set(pm) | set(plan.compilers))
    return plan


def _systemctl(root: Path, verb: str, *units: str) -> None:
    r = subprocess.run(["systemctl", f"--root={root}", "--quiet", verb, *units], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"systemctl {verb} {' '.join(units)} in the image failed: {r.stderr.strip()[:300]}")


def _replace(path: Path, text: str) -> None:
    """New inode with the old owner and mode: the old one may be shared with the cache."""
    st = path.lstat()
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, st.st_mode & 0o7777)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, st.st_mode & 0o7777)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def harden(cfg: BuildConfig, root: Path) -> list[str]:
    """Apply the profile's lock-down to `root`; returns the image paths it added or changed."""
    plan = plan_harden(cfg.profile, root)
    if plan.mask:
        _systemctl(root, "mask", *plan.mask)
    # Before the unit files go, so no timers.target.wants link is left dangling.
    if plan.disable:
        _systemctl(root, "disable", *plan.disable)
    for rel in plan.remove:
        _remove(root / rel)
    for rel, text in plan.rewrite.items():
        _replace(root / rel, text)
    _systemctl(root, "enable", *plan.enable)
    if cfg.profile == "production":
        left = match_paths(root, COMPILER_GLOBS + PACKAGE_MANAGER_GLOBS, NOT_COMPILERS)
        if left:
            raise BuildError(f"production image still has {', '.join(left[:5])} after hardening")
    return sorted(plan.rewrite)
