"""Crash-safe file writes: temp name in the same directory, fsync, rename, fsync the directory.
A power cut at any point leaves either the old file or the new one, never a mix."""
from __future__ import annotations

import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o600, piece: int = 1 << 20) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        mv = memoryview(data)
        # Written in pieces so a large package never needs a second full-size copy.
        for off in range(0, len(mv), piece):
            n = os.write(fd, mv[off:off + piece])
            while n < len(mv[off:off + piece]):
                n += os.write(fd, mv[off + n:off + piece])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Temp files left by a writer that died mid-write are garbage: delete them."""
    d = Path(directory)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX):
                p.unlink(missing_ok=True)
