"""Stage 3: turn the cached rootfs tarball into the image's root and boot trees.

Two parts: `prepare_base` (extract, move the kernel out, trim modules: depends only on the
rootfs and the board, so it is cached too) and `customise` (templates and profile, run on
every build on a hard-link copy of the base). Templates and profiles never touch the rootfs
cache.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import cache
from .config import BuildConfig
from .errors import BuildError
from .harden import harden
from .templates_render import render_tree
from .update_bundle import slot_env
from appliance.secure.slots import BOOT_LOCK, BOOT_PARTITION, BOOT_TRIES, STATE_FILE
from .verity import append_overlay, initramfs_overlay

UNITS_ENABLED = ("appliance-ready.service", "appliance-ssh-hostkeys.service", "systemd-networkd.service",
                 "systemd-repart.service")
AGENT_UNITS = ("appliance-runtime.service", "appliance-power.service", "appliance-update-bless.service")
AGENT_DIR = "opt/appliance/appliance-agent"
RUNTIME_PORT = 8500
UNITS_MASKED_ALWAYS = ("systemd-networkd-wait-online.service",)
BUILD_PUBKEY = "etc/appliance/build-key.pub.pem"


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    initrd: Path
    dtb_dir: Path | None


def find_kernel(root: Path) -> Kernel:
    versions = sorted(p.name for p in (root / "lib/modules").iterdir()) if (root / "lib/modules").is_dir() else []
    if len(versions) != 1:
        raise BuildError(f"rootfs: expected exactly one kernel in /lib/modules, found {versions or 'none'}")
    v = versions[0]
    vmlinuz, initrd = root / f"boot/vmlinuz-{v}", root / f"boot/initrd.img-{v}"
    for p in (vmlinuz, initrd):
        if not p.is_file():
            raise BuildError(f"rootfs: {p.relative_to(root)} is missing (kernel postinst or initramfs failed?)")
    dtbs = root / f"usr/lib/linux-image-{v}"
    return Kernel(v, vmlinuz, initrd, dtbs if dtbs.is_dir() else None)


def split_modules(rel_paths: list[str], keep_globs: list[str]) -> tuple[list[str], list[str]]:
    """Partition module paths (relative to .../kernel/) into (kept, dropped) by the board's globs."""
    kept, dropped = [], []
    for rel in rel_paths:
        (kept if any(fnmatch.fnmatch(rel, g) for g in keep_globs) else dropped).append(rel)
    return kept, dropped


def trim_modules(root: Path, version: str, keep_globs: list[str]) -> tuple[int, int]:
    kdir = root / "lib/modules" / version / "kernel"
    rels = [p.relative_to(kdir).as_posix() for p in kdir.rglob("*.ko*")]
    kept, dropped = split_modules(rels, keep_globs)
    for rel in dropped:
        (kdir / rel).unlink()
    for d in sorted((p for p in kdir.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    # depmod reads module metadata, not code: the host's depmod indexes a foreign kernel fine.
    r = subprocess.run(["depmod", "-b", str(root), version], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"depmod failed for {version}: {r.stderr.strip().splitlines()[-1:]}")
    return len(kept), len(dropped)


def dpkg_packages(root: Path) -> list[dict]:
    """Installed packages from the target's dpkg database (for the manifest and SBOM)."""
    status = (root / "var/lib/dpkg/status").read_text()
    pkgs = []
    for stanza in status.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, _, v = line.partition(":")
                fields[k] = v.strip()
        if fields.get("Status", "").endswith(" installed"):
            pkgs.append({
                "name": fields["Package"],
                "version": fields.get("Version", ""),
                "arch": fields.get("Architecture", ""),
                "source": fields.get("Source", fields["Package"]).split(" ")[0],
            })
    return sorted(pkgs, key=lambda p: p["name"])


def extract(tarball: Path, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["tar", "-xpf", str(tarball), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(root)],
        capture_output=True, text=True,
    )
    if r.returncode != 0:
        raise BuildError(f"extracting {tarball} failed: {r.stderr.strip()[:300]}")


def _systemctl(root: Path, verb: str, *units: str) -> None:
    r = subprocess.run(["systemctl", f"--root={root}", "--quiet", verb, *units], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"systemctl {verb} {' '.join(units)} in the image failed: {r.stderr.strip()[:300]}")


def template_context(cfg: BuildConfig, build_info: dict, agent: bool = False) -> dict:
    dev, _, baud = cfg.board.console.partition(",")
    board_dict = cfg.board.model_dump(mode="json")
    return {
        "image_name": cfg.image_name,
        "hostname": cfg.hostname,
        "board": cfg.board,
        "variant": cfg.variant_name,
        "profile": cfg.profile,
        "version": cfg.image_version,
        "console": cfg.board.console,
        "console_device": dev,
        "baud": baud,
        "dtb": cfg.dtb,
        "extra_cmdline": "" if cfg.profile == "debug" else "quiet loglevel=3",
        "board_json": json.dumps(board_dict, indent=2, sort_keys=True),
        "build_info_json": json.dumps(build_info, indent=2, sort_keys=True),
        "agent": agent,
        "agent_path": f"/{AGENT_DIR}/appliance-agent",
        "runtime_port": RUNTIME_PORT,
        # The sh fallback of the bless unit shares the agent's partition, lock and state file.
        "boot_partition": BOOT_PARTITION,
        "boot_lock": str(BOOT_LOCK),
        "boot_state_file": STATE_FILE,
        "ssh_ca": cfg.ssh_ca,
        "vendor_public_key": cfg.vendor_key,
    }


def base_key(cfg: BuildConfig, rootfs_key: str) -> str:
    """Everything the template-independent part depends on (this file's code included)."""
    return cache.inputs_hash({
        "stage": "base", "rootfs": rootfs_key, "keep": cfg.board.modules.keep, "dtb": cfg.dtb,
        "boot": cfg.board.boot, "arch": cfg.board.arch, "epoch": cfg.source_date_epoch,
        "code": [cache.file_digest(Path(__file__)), cache.file_digest(Path(__file__).with_name("verity.py")),
                 cache.tree_digest(Path(__file__).with_name("templates") / "initramfs")],
    })


def prepare_base(cfg: BuildConfig, tarball: Path, dest: Path) -> None:
    """The template-independent part of customising, cached as dest/{root,boot,facts.json}."""
    root, boot = dest / "root", dest / "boot"
    extract(tarball, root)
    kernel = find_kernel(root)
    slot = boot / "a"
    slot.mkdir(parents=True)
    shutil.copy2(kernel.vmlinuz, slot / "vmlinuz")
    shutil.copy2(kernel.initrd, slot / "initrd.img")
    if cfg.dtb:
        if kernel.dtb_dir is None or not (kernel.dtb_dir / cfg.dtb).is_file():
            raise BuildError(f"board {cfg.board.name}: kernel {kernel.version} ships no {cfg.dtb}")
        (slot / "dtbs" / cfg.dtb).parent.mkdir(parents=True)
        shutil.copy2(kernel.dtb_dir / cfg.dtb, slot / "dtbs" / cfg.dtb)
    # The kernel and DTBs live on the boot partition; a second copy in the root only costs space.
    for p in (root / "boot").iterdir():
        p.unlink() if not p.is_dir() or p.is_symlink() else shutil.rmtree(p)
    if kernel.dtb_dir is not None:
        shutil.rmtree(kernel.dtb_dir)
    if cfg.board.boot == "uefi":
        install_systemd_boot(root, boot, cfg.board.arch)
    for link in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        if (root / link).is_symlink():
            (root / link).unlink()
    kept, dropped = trim_modules(root, kernel.version, cfg.board.modules.keep)
    append_overlay(slot / "initrd.img", initramfs_overlay(root, cfg.board.arch, cfg.source_date_epoch))
    # Keys made by openssh-server's postinst would be shared by every device: drop them.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "data").mkdir(exist_ok=True)
    clamp_mtimes(root, cfg.source_date_epoch)
    clamp_mtimes(boot, cfg.source_date_epoch)
    facts = {"kernel": kernel.version, "modules_kept": kept, "modules_dropped": dropped,
             "packages": dpkg_packages(root)}
    (dest / "facts.json").write_text(json.dumps(facts))


def hardlink_tree(src: Path, dst: Path) -> None:
    """A copy in well under a second: new directories, shared file inodes. Whoever changes a
    file in `dst` must replace it (unlink, then create), never write into it, or the cache
    entry behind `src` changes too."""
    r = subprocess.run(["cp", "-al", str(src), str(dst)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"copying {src} failed: {r.stderr.strip()[:300]}")


def customise(cfg: BuildConfig, base: Path, root: Path, boot: Path, build_info: dict,
              agent_bundle: Path | None = None, build_pub_pem: bytes | None = None) -> dict:
    """Fill `root` (the future erofs) and `boot` (the boot partition) from the cached base
    tree plus templates, profile and the frozen agent. Returns facts for the manifest."""
    hardlink_tree(base / "root", root)
    hardlink_tree(base / "boot", boot)
    facts = json.loads((base / "facts.json").read_text())
    if agent_bundle is not None:
        (root / AGENT_DIR).parent.mkdir(parents=True, exist_ok=True)
        hardlink_tree(agent_bundle, root / AGENT_DIR)
    ctx = template_context(cfg, build_info, agent=agent_bundle is not None)
    rendered = render_tree("rootfs", root, ctx, cfg.templates_overlay)
    if build_pub_pem is not None:
        # Update bundles are checked against this key on the device (issue 3).
        (root / BUILD_PUBKEY).write_bytes(build_pub_pem)
    _systemctl(root, "enable", *UNITS_ENABLED, *(AGENT_UNITS if agent_bundle is not None else ()))
    _systemctl(root, "mask", *UNITS_MASKED_ALWAYS)
    rendered += harden(cfg, root)
    clamp_mtimes(root, cfg.source_date_epoch)
    return {**facts, "rendered": sorted(rendered), "context": ctx}


def finish_boot(cfg: BuildConfig, boot: Path, ctx: dict, verity: dict) -> list[str]:
    """Boot loader configuration, rendered once the root (and so its root hash) exists."""
    rendered = render_tree(f"boot-{cfg.board.boot}", boot, {**ctx, "verity": verity, "boot_tries": BOOT_TRIES},
                           cfg.templates_overlay)
    if cfg.board.boot == "u-boot":
        (boot / "a").mkdir(exist_ok=True)
        (boot / "a" / "slot.env").write_text(slot_env(cfg, verity, "a", ctx))
        rendered.append("a/slot.env")
        compile_boot_script(boot / "boot.cmd", boot / "boot.scr", cfg.board.arch, cfg.source_date_epoch)
        rendered.append("boot.scr")
    else:
        # A fresh image's slot a is known good: its entry carries no boot counter.
        (boot / "loader/entries").mkdir(parents=True, exist_ok=True)
        (boot / "loader/entries/slot-a.conf").write_text(slot_env(cfg, verity, "a", ctx))
        rendered.append("loader/entries/slot-a.conf")
    clamp_mtimes(boot, cfg.source_date_epoch)
    return rendered


MKIMAGE_ARCH = {"arm64": "arm64", "armhf": "arm", "amd64": "x86_64", "riscv64": "riscv"}


def compile_boot_script(src: Path, out: Path, arch: str, epoch: int) -> None:
    """boot.cmd -> boot.scr (a legacy U-Boot script image); the header time is the build date."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    r = subprocess.run(["mkimage", "-A", MKIMAGE_ARCH.get(arch, arch), "-O", "linux", "-T", "script", "-C", "none",
                        "-n", "appliance A/B boot", "-d", str(src), str(out)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise BuildError(f"mkimage (boot.scr from {src.name}) failed: {(r.stderr or r.stdout).strip()[:300]}")


EFI_NAMES = {"amd64": ("systemd-bootx64.efi", "BOOTX64.EFI"), "arm64": ("systemd-bootaa64.efi", "BOOTAA64.EFI")}


def install_systemd_boot(root: Path, boot: Path, arch: str) -> None:
    """The removable-media path (EFI/BOOT/BOOTx.EFI) boots without NVRAM entries, as a fresh
    board and OVMF both need."""
    src_name, dst_name = EFI_NAMES[arch]
    src = root / "usr/lib/systemd/boot/efi" / src_name
    if not src.is_file():
        raise BuildError(f"rootfs: {src.relative_to(root)} missing (package systemd-boot-efi)")
    for d in ("EFI/BOOT", "EFI/systemd"):
        (boot / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, boot / "EFI/BOOT" / dst_name)
    shutil.copy2(src, boot / "EFI/systemd" / src_name)


def clamp_mtimes(tree: Path, epoch: int) -> None:
    """Any file touched after SOURCE_DATE_EPOCH gets it, so the filesystems are reproducible."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_mtime > epoch:
                os.utime(p, (epoch, epoch), follow_symlinks=False)
    os.utime(tree, (epoch, epoch))
