"""Stage 2: the Debian root filesystem as a tarball made by mmdebstrap, cached by its inputs.

Everything that changes the tarball is in `plan_rootfs(...)`, and its hash is the cache key;
templates and profiles are applied later (customise), so changing them never re-runs mmdebstrap.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import cache
from .boards import DEB_ARCH_TO_QEMU
from .config import BuildConfig
from .errors import BuildError

# Packages every image carries. Later parts (locked-down access, secure store) need sshd,
# nftables, softhsm2 and veritysetup; they are here so adding those parts does not force
# a cold rebuild on every developer machine.
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "kmod", "dbus", "initramfs-tools", "e2fsprogs",
    "iproute2", "systemd-repart", "openssh-server", "nftables", "softhsm2", "cryptsetup-bin",
    "procps",
    # fsck.fat: the updater checks the vfat boot partition before each mount (power cuts).
    "dosfstools",
)

# Documentation, man pages and translations never reach the device (copyright files stay:
# they are the licence record the SBOM points to).
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)


@dataclass(frozen=True)
class RootfsPlan:
    arch: str
    suite: str
    mirror: str
    packages: tuple[str, ...]
    initramfs_modules: tuple[str, ...]
    dpkg_options: tuple[str, ...]
    source_date_epoch: int

    def key(self) -> str:
        return cache.inputs_hash({"stage": "rootfs", "v": 1, **self.__dict__})

    def mmdebstrap_argv(self, output: Path) -> list[str]:
        modules = "\n".join(self.initramfs_modules) + "\n"
        # initramfs-tools reads module lists from modules.d too; writing it before the kernel
        # is installed means the kernel's own postinst builds the right initramfs once.
        setup = (
            'mkdir -p "$1/usr/share/initramfs-tools/modules.d" && printf %s '
            + shlex.quote(modules)
            + ' > "$1/usr/share/initramfs-tools/modules.d/appliance.conf"'
        )
        argv = [
            "mmdebstrap", "--mode=root", "--variant=apt", f"--arch={self.arch}",
            "--format=tar", f"--include={','.join(self.packages)}",
            "--aptopt=Acquire::Retries 3", f"--setup-hook={setup}",
        ]
        argv += [f"--dpkgopt={o}" for o in self.dpkg_options]
        argv += [self.suite, str(output), self.mirror]
        return argv


def initramfs_union(boards) -> tuple[str, ...]:
    """Modules forced into the initramfs, first-seen order over boards sorted by name.

    One rootfs serves every board of an arch and suite (a second 10-minute mmdebstrap under
    emulation per board would buy nothing: the lists only add small modules).
    """
    seen: dict[str, None] = {}
    for b in sorted(boards, key=lambda b: b.name):
        for m in b.modules.initramfs:
            seen.setdefault(m, None)
    return tuple(seen)


BOOT_PACKAGES = {"u-boot": (), "uefi": ("systemd-boot-efi",)}


def plan_rootfs(cfg: BuildConfig) -> RootfsPlan:
    peers = cfg.peers or (cfg.board,)
    boot_pkgs = {p for b in peers for p in BOOT_PACKAGES[b.boot]}
    pkgs = sorted(set(BASE_PACKAGES) | {cfg.board.kernel_package} | boot_pkgs)
    return RootfsPlan(
        arch=cfg.board.arch,
        suite=cfg.board.suite,
        mirror=cfg.mirror,
        packages=tuple(pkgs),
        initramfs_modules=initramfs_union(peers),
        dpkg_options=DPKG_OPTIONS,
        source_date_epoch=cfg.source_date_epoch,
    )


def host_deb_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def check_foreign_arch(arch: str) -> None:
    """Foreign chroots need qemu-user registered with binfmt_misc; say exactly how to fix it."""
    if arch == host_deb_arch():
        return
    q = DEB_ARCH_TO_QEMU[arch]
    handler = Path("/proc/sys/fs/binfmt_misc") / f"qemu-{q}"
    if not Path("/proc/sys/fs/binfmt_misc/status").exists():
        raise BuildError(
            f"building for {arch} needs binfmt_misc: run `mount -t binfmt_misc binfmt_misc "
            f"/proc/sys/fs/binfmt_misc && update-binfmts --enable qemu-{q}` (package qemu-user-static)"
        )
    if not handler.exists() or not handler.read_text().startswith("enabled"):
        raise BuildError(
            f"building for {arch} needs qemu-user: run `apt-get install qemu-user-static binfmt-support "
            f"&& update-binfmts --enable qemu-{q}`"
        )


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BuildError(f"missing tool(s): {', '.join(missing)}; run scripts/install-system-deps.sh")


def build_rootfs(plan: RootfsPlan, log_path: Path | None = None) -> tuple[Path, bool]:
    """Return (tarball path, cache hit)."""
    key = plan.key()
    hit = cache.lookup("rootfs", key)
    if hit:
        return hit / "rootfs.tar", True
    require_tools("mmdebstrap")
    check_foreign_arch(plan.arch)

    def produce(d: Path) -> None:
        out = d / "rootfs.tar"
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(plan.source_date_epoch))
        log = open(log_path or d / "mmdebstrap.log", "w")
        with log:
            r = subprocess.run(plan.mmdebstrap_argv(out), stdout=log, stderr=subprocess.STDOUT, env=env)
        if r.returncode != 0:
            why = explain_failure(Path(log.name).read_text(errors="replace"), plan.mirror)
            raise BuildError(f"mmdebstrap failed for {plan.suite}/{plan.arch}: {why} (full log: {log.name})")
        (d / "packages.txt").write_text("\n".join(plan.packages) + "\n")

    entry, _ = cache.cached("rootfs", key, produce)
    return entry / "rootfs.tar", False


def explain_failure(log_text: str, mirror: str) -> str:
    """The one line of an mmdebstrap log a user can act on."""
    lines = [l.strip() for l in log_text.splitlines() if l.strip()]
    for l in lines:
        if "Could not connect" in l or "Could not resolve" in l or "Temporary failure resolving" in l \
                or ("Failed to fetch" in l and "InRelease" in l):
            return f"mirror {mirror} unreachable ({l.removeprefix('E: ')[:200]}); check --mirror and the network"
        if "Unable to locate package" in l or "has no installation candidate" in l:
            return f"{l.removeprefix('E: ')[:200]} (check the board's kernel_package and the suite)"
        if "No space left on device" in l:
            return "disk full while running mmdebstrap (free space in the cache dir and /tmp)"
    errors = [l for l in lines if l.startswith("E:") and "mmdebstrap failed to run" not in l]
    if errors:
        return errors[0].removeprefix("E: ")[:300]
    return lines[-1][:300] if lines else "no output"
