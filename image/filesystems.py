"""Stage 4: filesystem images from directories, without loop mounts (none work here)."""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from .errors import BuildError

MiB = 1 << 20


def _run(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise BuildError(f"{what} failed: {msg[-1] if msg else 'exit ' + str(r.returncode)}")


def stable_uuid(*parts: str) -> str:
    """Deterministic UUIDs keep images of the same inputs identical."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "appliance:" + ":".join(parts)))


def make_ext4(src: Path | None, out: Path, size_mib: int, label: str, fs_uuid: str, epoch: int) -> None:
    if out.exists():
        out.unlink()
    with open(out, "wb") as f:
        f.truncate(size_mib * MiB)
    argv = ["mkfs.ext4", "-q", "-F", "-L", label, "-U", fs_uuid, "-E", f"root_owner=0:0,hash_seed={fs_uuid}",
            "-T", "default", "-m", "0"]
    if src is not None:
        argv += ["-d", str(src)]
    argv += [str(out)]
    r = subprocess.run(argv, capture_output=True, text=True, env={"E2FSPROGS_FAKE_TIME": str(epoch), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()
        hint = " (the board's partition is too small for its content)" if any("No space" in l or "Could not allocate" in l for l in tail) else ""
        raise BuildError(f"mkfs.ext4 for partition {label!r} failed: {tail[-1] if tail else r.returncode}{hint}")


def make_erofs(src: Path, out: Path, fs_uuid: str, epoch: int, compress: str | None = "lz4hc") -> int:
    """Read-only root. Returns its size in bytes."""
    if out.exists():
        out.unlink()
    argv = ["mkfs.erofs", "--quiet", f"-T{epoch}", f"-U{fs_uuid}"]
    if compress:
        argv.append(f"-z{compress}")
    argv += [str(out), str(src)]
    _run(argv, "mkfs.erofs for the root filesystem")
    return out.stat().st_size


def make_vfat(src: Path, out: Path, size_mib: int, label: str, volume_id: str, epoch: int) -> None:
    """The boot partition (ESP on UEFI boards, boot.scr + slots on U-Boot boards), filled with
    mtools (vfat cannot be loop-mounted here). FAT32 needs at least ~33 MiB; smaller is FAT16."""
    if out.exists():
        out.unlink()
    with open(out, "wb") as f:
        f.truncate(size_mib * MiB)
    _run(["mkfs.vfat", "-F", "32" if size_mib >= 64 else "16", "-n", label.upper()[:11], "-i", volume_id, "--invariant", str(out)],
         f"mkfs.vfat for partition {label!r}")
    entries = sorted(p.name for p in src.iterdir())
    if entries:
        env_tz = {"TZ": "UTC", "SOURCE_DATE_EPOCH": str(epoch), "MTOOLS_SKIP_CHECK": "1",
                  "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        r = subprocess.run(["mcopy", "-s", "-p", "-m", "-i", str(out), *[str(src / e) for e in entries], "::/"],
                           capture_output=True, text=True, env=env_tz)
        if r.returncode != 0:
            raise BuildError(f"mcopy into partition {label!r} failed: {r.stderr.strip()[:300]}")
