"""The build: config -> rootfs (cached) -> customise -> filesystems -> disk -> artefacts."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from . import cache
from .artefacts import bmap_mapped_bytes, finish_bmap, hash_image, sbom, start_bmap, write_json
from .config import BuildConfig
from .customise import base_key, customise, finish_boot, prepare_base
from .verity import format_root
from .disk import plan_disk, write_disk
from .errors import BuildError
from .filesystems import make_erofs, make_ext4, make_vfat, stable_uuid
from .rootfs import build_rootfs, plan_rootfs, require_tools
from .signing import fingerprint, load_or_create_key, public_pem, sign
from .templates_render import TEMPLATES
from .update_bundle import write_bundle


@dataclass
class BuildResult:
    image: Path
    bmap: Path
    manifest: Path
    sbom: Path
    rootfs_cache_hit: bool
    timings: dict[str, float] = field(default_factory=dict)
    manifest_data: dict = field(default_factory=dict)
    update: Path | None = None


class Stages:
    """Runs named stages with a live status line and records how long each took."""

    def __init__(self, console: Console):
        self.console = console
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        t0 = time.monotonic()
        with self.console.status(f"[bold]{name}[/] {detail}", spinner="dots"):
            yield
        dt = time.monotonic() - t0
        self.timings[name] = dt
        self.console.print(f"[green]done[/] {name} ({dt:.1f} s)")


def inputs_digest(cfg: BuildConfig, rootfs_key: str) -> str:
    blobs = {}
    if cfg.bootloader_dir and cfg.board.bootloader:
        blobs = {b.file: cache.file_digest(cfg.bootloader_dir / b.file) for b in cfg.board.bootloader.blobs}
    code = cache.tree_digest(Path(__file__).resolve().parent)
    return cache.inputs_hash({
        "rootfs": rootfs_key, "templates": cache.tree_digest(TEMPLATES), "code": code,
        "overlay": cache.tree_digest(cfg.templates_overlay) if cfg.templates_overlay else None,
        "data_tree": cache.tree_digest(cfg.data_tree) if cfg.data_tree else None,
        "board": cfg.board.model_dump(mode="json"), "variant": cfg.variant_name, "profile": cfg.profile,
        "version": cfg.image_version, "blobs": blobs, "sde": cfg.source_date_epoch, "ssh_ca": cfg.ssh_ca,
        "vendor_key": cfg.vendor_key,
    })


def build(cfg: BuildConfig, console: Console | None = None) -> BuildResult:
    console = console or Console(stderr=True)
    require_tools("mkfs.ext4", "mkfs.erofs", "sfdisk", "bmaptool", "tar", "depmod", "systemctl", "mkfs.vfat",
                  "mcopy", *(("mkimage",) if cfg.board.boot == "u-boot" else ()))
    st = Stages(console)
    # A bad key must fail before the long stages, not after them.
    signing, key_path, created = load_or_create_key(cfg.signing_key)
    if created:
        console.print(f"created build signing key {key_path} (keep it: images are signed with it)", soft_wrap=True)
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    name = cfg.image_name
    final = {k: out_dir / f"{name}{ext}" for k, ext in
             (("img", ".img"), ("bmap", ".img.bmap"), ("manifest", ".manifest.json"), ("sbom", ".sbom.spdx.json"),
              ("sig", ".manifest.json.sig"), ("pub", ".build-key.pub.pem"))}
    # The update bundle for devices already in the field (A/B: see appliance.secure.update).
    final["update"] = out_dir / f"{name}.update"
    # The issue promises out/NAME/manifest.json too: it is the same file under the short name.
    partial = {k: p.with_name(f".{p.name}.partial") for k, p in final.items()}
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out_dir))
    ok = False
    try:
        plan = plan_rootfs(cfg)
        key = plan.key()
        cached = cache.lookup("rootfs", key) is not None
        with st.stage("rootfs", f"{plan.suite}/{plan.arch} " + ("(cached)" if cached else "(mmdebstrap, several minutes)")):
            tarball, hit = build_rootfs(plan, log_path=out_dir / "mmdebstrap.log" if not cached else None)
        digest = inputs_digest(cfg, key)
        build_info = {
            "name": name, "board": cfg.board.name, "variant": cfg.variant_name, "profile": cfg.profile,
            "version": cfg.image_version, "inputs": digest, "suite": cfg.board.suite, "arch": cfg.board.arch,
        }
        root, boot = work / "root", work / "boot"
        bkey = base_key(cfg, key)
        with st.stage("base tree", "(cached)" if cache.lookup("base", bkey) else "(extract, kernel, modules)"):
            base, _ = cache.cached("base", bkey, lambda d: prepare_base(cfg, tarball, d))
        bundle = None
        if cfg.with_agent:
            from .bundle import build_agent_bundle, plan_bundle

            bkey_agent = plan_bundle(cfg.board.arch, cfg.board.suite, mirror=cfg.mirror).bundle_key()
            warm = cache.lookup("agent-bundle", bkey_agent) is not None
            with st.stage("agent bundle", "(cached)" if warm else "(PyInstaller in a target chroot, minutes)"):
                bundle = build_agent_bundle(cfg.board.arch, cfg.board.suite, mirror=cfg.mirror)
        with st.stage("customise"):
            facts = customise(cfg, base, root, boot, build_info, bundle, public_pem(signing))
        epoch = cfg.source_date_epoch
        layout = plan_disk(cfg)
        with st.stage("filesystems"):
            boot_img, root_img, data_img = work / "boot.fs", work / "root.fs", work / "data.fs"
            root_size = make_erofs(root, root_img, stable_uuid(name, "fs", "root"), epoch)
            shutil.rmtree(root)  # frees ~1 GB before the disk is written
            verity = format_root(root_img, name)
            ctx = facts.pop("context")
            facts["rendered"] += [f"boot:{p}" for p in finish_boot(cfg, boot, ctx, verity)]
            make_vfat(boot, boot_img, cfg.board.disk.boot_mib, "boot", stable_uuid(name, "fs", "boot")[:8], epoch)
            make_ext4(cfg.data_tree, data_img, cfg.board.disk.data_mib, "data", stable_uuid(name, "fs", "data"), epoch)
        with st.stage("disk"):
            write_disk(layout, partial["img"], {"boot": boot_img, "root-a": root_img, "data": data_img},
                       cfg.bootloader_dir)
        with st.stage("artefacts"):
            bmap_proc = start_bmap(partial["img"], partial["bmap"])
            try:
                img_sha, part_sha = hash_image(partial["img"], layout)
            finally:
                finish_bmap(bmap_proc)
            manifest = {
                **build_info,
                "variant": cfg.variant_name,
                "image": {"file": final["img"].name, "bytes": layout.nbytes, "sha256": img_sha,
                          "bmap": final["bmap"].name, "mapped_bytes": bmap_mapped_bytes(partial["bmap"])},
                "partitions": [
                    {"label": p.label, "start_sector": p.start, "sectors": p.size, "type": p.type_guid,
                     "uuid": p.uuid, "sha256": part_sha[p.label]} for p in layout.partitions
                ],
                "root": {"fstype": "erofs", "bytes": root_size, "verity": verity},
                "bootloader": [{"file": b.file, "sector": b.sector} for b in layout.blobs],
                "kernel": facts["kernel"],
                "modules": {"kept": facts["modules_kept"], "dropped": facts["modules_dropped"]},
                "packages": facts["packages"],
                "rootfs_cache_key": key,
                "signing_key": {"algorithm": "ed25519", "fingerprint": fingerprint(signing)},
                "agent": json.loads((bundle.parent / "manifest.json").read_text()) if bundle else None,
            }
            if "update" in final:
                manifest["update"] = write_bundle(partial["update"], cfg, verity, root_img, boot / "a",
                                                  lambda data: sign(signing, data), ctx)
                manifest["update"]["file"] = final["update"].name
            write_json(partial["sbom"], sbom(name, cfg.image_version, facts["packages"], epoch))
            write_json(partial["manifest"], manifest)
            partial["sig"].write_bytes(sign(signing, partial["manifest"].read_bytes()))
            partial["pub"].write_bytes(public_pem(signing))
        # Publish: a stale manifest must never describe a new image, so it goes first and comes back last.
        short = out_dir / "manifest.json"
        for p in (short, final["manifest"], final["sig"]):
            if p.exists():
                p.unlink()
        for k in ("img", "bmap", "sbom", "pub", *(("update",) if "update" in final else ()), "sig", "manifest"):
            os.rename(partial[k], final[k])
        os.link(final["manifest"], short)
        ok = True
        return BuildResult(final["img"], final["bmap"], final["manifest"], final["sbom"], hit, st.timings, manifest,
                           final.get("update"))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise BuildError(f"disk full while building {name} in {out_dir} (free space, then rebuild)") from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not ok:
            for p in partial.values():
                p.unlink(missing_ok=True)
