"""dm-verity for the read-only root: the hash tree is made on the build host, and a small
initramfs overlay opens it on the device before the root is mounted.

Debian's initramfs-tools has no verity support, and regenerating the initramfs means running
mkinitramfs under emulation (minutes); instead a second cpio archive is appended to the
initrd (the kernel unpacks concatenated archives in order). It carries a local-top script,
the ORDER file that runs it, and `veritysetup` with the libraries it needs, all taken from the
target root.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
from pathlib import Path

from .errors import BuildError
from .templates_render import render_tree

MAPPER_NAME = "vroot"
BLOCK = 4096
TRIPLETS = {"arm64": "aarch64-linux-gnu", "amd64": "x86_64-linux-gnu"}


# --- newc cpio (what the kernel unpacks) -------------------------------------------------

def _newc_entry(name: str, mode: int, data: bytes, ino: int, mtime: int) -> bytes:
    nb = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(nb), 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = head + nb
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def newc_archive(entries: list[tuple[str, int, bytes]], mtime: int) -> bytes:
    """entries: (path without leading /, mode incl. file type, content); directories first."""
    blob = b"".join(_newc_entry(n, m, d, i + 1, mtime) for i, (n, m, d) in enumerate(entries))
    blob += _newc_entry("TRAILER!!!", 0, b"", 0, 0)
    return blob + b"\0" * (-len(blob) % 512)


# --- what veritysetup needs from the target root ----------------------------------------

def needed_libs(binary: Path) -> list[str]:
    r = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"readelf failed on {binary}: {r.stderr.strip()[:200]}")
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", r.stdout)


def library_closure(root: Path, binary: Path, triplet: str) -> dict[str, Path]:
    """soname -> file inside `root`, for every library `binary` needs, recursively."""
    # Library symlinks in Debian are relative, so opening them inside `root` stays inside it.
    libdirs = [root / "usr/lib" / triplet, root / "usr/lib"]
    found: dict[str, Path] = {}
    todo = needed_libs(binary)
    while todo:
        so = todo.pop()
        if so in found:
            continue
        path = next((d / so for d in libdirs if (d / so).exists()), None)
        if path is None:
            raise BuildError(f"initramfs overlay: {so} (needed by {binary.name}) not found in the image root")
        found[so] = path
        todo.extend(needed_libs(path))
    return found


def initramfs_overlay(root: Path, arch: str, epoch: int) -> bytes:
    triplet = TRIPLETS[arch]
    veritysetup = root / "usr/sbin/veritysetup"
    if not veritysetup.is_file():
        raise BuildError("image root has no /usr/sbin/veritysetup (package cryptsetup-bin)")
    with tempfile.TemporaryDirectory() as tmp:
        render_tree("initramfs", Path(tmp), {"mapper_name": MAPPER_NAME})
        script = (Path(tmp) / "scripts/local-top/appliance-verity").read_bytes()
        machine_id = (Path(tmp) / "scripts/local-bottom/appliance-machine-id").read_bytes()
    order = b'/scripts/local-top/appliance-verity "$@"\n[ -e /conf/param.conf ] && . /conf/param.conf\n'
    order_bottom = b'/scripts/local-bottom/appliance-machine-id "$@"\n[ -e /conf/param.conf ] && . /conf/param.conf\n'
    entries: list[tuple[str, int, bytes]] = [
        ("scripts", 0o40755, b""), ("scripts/local-top", 0o40755, b""),
        ("scripts/local-top/appliance-verity", 0o100755, script),
        ("scripts/local-top/ORDER", 0o100644, order),
        ("scripts/local-bottom", 0o40755, b""),
        ("scripts/local-bottom/appliance-machine-id", 0o100755, machine_id),
        ("scripts/local-bottom/ORDER", 0o100644, order_bottom),
        ("usr", 0o40755, b""), ("usr/sbin", 0o40755, b""), ("usr/lib", 0o40755, b""),
        (f"usr/lib/{triplet}", 0o40755, b""),
        ("usr/sbin/veritysetup", 0o100755, veritysetup.read_bytes()),
    ]
    # Modes come from the target root: the dynamic loader, for one, must stay executable or
    # every binary in the initramfs fails with EACCES.
    for so, path in sorted(library_closure(root, veritysetup, triplet).items()):
        entries.append((f"usr/lib/{triplet}/{so}", 0o100000 | (path.stat().st_mode & 0o7777), path.read_bytes()))
    return newc_archive(entries, epoch)


def append_overlay(initrd: Path, overlay: bytes) -> None:
    data = initrd.read_bytes()
    pad = b"\0" * (-len(data) % 512)
    tmp = initrd.with_name(initrd.name + ".partial")
    tmp.write_bytes(data + pad + overlay)
    tmp.replace(initrd)


# --- the hash tree -------------------------------------------------------------------------

def format_root(fs_image: Path, name: str) -> dict:
    """Append the hash tree to the erofs image in place. Returns roothash, hash_offset, salt."""
    size = fs_image.stat().st_size
    offset = -(-size // BLOCK) * BLOCK
    with open(fs_image, "r+b") as f:
        f.truncate(offset)
    # Deterministic salt and UUID: the same root gives the same root hash.
    salt = hashlib.sha256(b"appliance-verity:" + name.encode()).hexdigest()
    uuid = "-".join((salt[:8], salt[8:12], "4" + salt[13:16], "8" + salt[17:20], salt[20:32]))
    r = subprocess.run(["veritysetup", "format", str(fs_image), str(fs_image), f"--hash-offset={offset}",
                        f"--data-blocks={offset // BLOCK}", f"--salt={salt}", f"--uuid={uuid}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"veritysetup format failed: {(r.stderr or r.stdout).strip()[:300]}")
    m = re.search(r"Root hash:\s+([0-9a-f]{64})", r.stdout)
    if not m:
        raise BuildError("veritysetup format printed no root hash")
    return {"roothash": m.group(1), "hash_offset": offset, "data_blocks": offset // BLOCK, "salt": salt,
            "bytes": fs_image.stat().st_size}
