"""Crash-safe file writes: temp name in the same directory, fsync, rename, fsync the directory.
A power cut at any point leaves either the old file or the new one, never a mix."""
from __future__ import annotations

import os
import stat
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o600, piece: int = 1 << 20) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the caller's umask
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
    fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make renames and new names in `directory` durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
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


def share_with_group(root: str | os.PathLike) -> int:
    """Give `root`'s group read access to everything under it (files g+r, directories g+rx,
    group set to root's group); never write access, never anything for others. Does nothing
    unless `root` is a setgid directory its group may read (the image's token dir is 2750
    root:softhsm): that mode is the opt-in, so a plain 0755 directory is left alone. Returns
    the number of entries changed."""
    root = Path(root)
    st = os.stat(root)
    if not (st.st_mode & stat.S_ISGID and st.st_mode & 0o040):
        return 0
    gid, changed = st.st_gid, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            if not (stat.S_ISDIR(s.st_mode) or stat.S_ISREG(s.st_mode)):
                continue
            want = s.st_mode | (0o050 if stat.S_ISDIR(s.st_mode) else 0o040)
            if s.st_gid != gid:
                os.chown(p, -1, gid)
                changed += 1
            if stat.S_IMODE(want) != stat.S_IMODE(s.st_mode):
                os.chmod(p, stat.S_IMODE(want))
                changed += 1
    return changed
