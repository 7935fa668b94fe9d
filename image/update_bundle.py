"""The update bundle (NAME.update) that `appliance-agent update install` reads on a device.

Written from the same root filesystem (erofs + verity) and boot files as the image, so a device
updated over the air runs byte-for-byte what a freshly flashed one runs. Format: see
appliance.secure.update. Member order matters: the device reads the signed header first and
checks it before it writes anything.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from .artefacts import file_sha256
from .config import BuildConfig
from .templates_render import TEMPLATES

FORMAT = 1  # appliance.secure.update.FORMAT
SLOTS = ("a", "b")


def slot_env(cfg: BuildConfig, verity: dict, slot: str, ctx: dict | None = None) -> str:
    """What boots a slot: U-Boot: a/slot.env (kernel arguments for boot.scr); UEFI: the
    systemd-boot entry. `ctx`: the image's template context (console, version, ...)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES / "slot")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    if ctx is None:
        from .customise import template_context

        ctx = template_context(cfg, {})
    return env.get_template(f"{cfg.board.boot}.env.j2").render(**{**ctx, "slot": slot, "verity": verity})


def boot_files(slot_dir: Path) -> list[tuple[str, Path]]:
    """(path inside the slot directory, file) for what a slot boots: kernel, initrd, DTBs."""
    out = []
    for p in sorted(slot_dir.rglob("*")):
        rel = p.relative_to(slot_dir).as_posix()
        if p.is_file() and rel != "slot.env":
            out.append((rel, p))
    return out


def plan_header(cfg: BuildConfig, verity: dict, root_img: Path, root_sha256: str,
                files: list[tuple[str, Path]], digests: dict[str, str], ctx: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "image_name": cfg.image_name,
        "board": cfg.board.name,
        "variant": cfg.variant_name,
        "profile": cfg.profile,
        "version": cfg.image_version,
        "root": {"file": "root.img", "bytes": root_img.stat().st_size, "sha256": root_sha256, "verity": verity},
        "boot": [{"path": rel, "bytes": p.stat().st_size, "sha256": digests[rel]} for rel, p in files],
        "slot_env": {s: slot_env(cfg, verity, s, ctx) for s in SLOTS},
    }


def _tarinfo(name: str, size: int, epoch: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, epoch, 0o644, 0, 0, "root", "root"
    return ti


def write_bundle(out: Path, cfg: BuildConfig, verity: dict, root_img: Path, slot_dir: Path, sign,
                 ctx: dict | None = None) -> dict:
    """Write the bundle to `out` (the caller renames it into place); `sign(bytes) -> b64 bytes`."""
    files = boot_files(slot_dir)
    digests = {rel: file_sha256(p) for rel, p in files}
    header = plan_header(cfg, verity, root_img, file_sha256(root_img), files, digests, ctx)
    data = json.dumps(header, indent=2, sort_keys=True).encode() + b"\n"
    sig = sign(data)
    epoch = cfg.source_date_epoch
    with open(out, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_tarinfo("update.json", len(data), epoch), io.BytesIO(data))
        tf.addfile(_tarinfo("update.json.sig", len(sig), epoch), io.BytesIO(sig))
        for rel, p in files:
            with open(p, "rb") as src:
                tf.addfile(_tarinfo(f"boot/{rel}", p.stat().st_size, epoch), src)
        with open(root_img, "rb") as src:
            tf.addfile(_tarinfo("root.img", root_img.stat().st_size, epoch), src)
        tf.close()
        f.flush()
        os.fsync(f.fileno())
    return {"file": out.name, "bytes": out.stat().st_size, "sha256": file_sha256(out),
            "header_sha256": hashlib.sha256(data).hexdigest()}
