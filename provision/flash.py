"""Flash an image to a block device or file with bmaptool, then verify by reading it back.

Planning (``check_target``) is separate from effects (``write_image``, ``verify_target``):
the checks only read, so they can refuse before a single byte is written.

Verification re-reads every mapped range of the bmap *from the target* after the write was
synced and the target's page cache dropped, and compares it with the bmap's checksums;
``bmaptool copy`` only checksums the source, so a card that drops writes passes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import bmap as bmapmod
from .errors import ProvisionError

BLKGETSIZE64 = 0x80081272
BLKFLSBUF = 0x1261


@dataclass(frozen=True)
class Target:
    path: Path
    is_block: bool
    exists: bool
    size: int  # bytes; 0 for a file that does not exist yet
    rdev: tuple[int, int] | None  # (major, minor) of a block device


def inspect_target(path: Path) -> Target:
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ProvisionError(f"{path}: target directory {path.parent} does not exist") from None
        return Target(path, False, False, 0, None)
    except OSError as e:
        raise ProvisionError(f"{path}: cannot stat target: {e.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        return Target(path, True, True, _block_size(path, rdev), rdev)
    if stat.S_ISREG(st.st_mode):
        return Target(path, False, True, st.st_size, None)
    raise ProvisionError(f"{path}: target is neither a block device nor a regular file")


def _block_size(path: Path, rdev: tuple[int, int]) -> int:
    # sysfs first: it needs no open() (which a busy or access-restricted device may refuse)
    sysfile = Path("/sys/dev/block") / f"{rdev[0]}:{rdev[1]}" / "size"
    try:
        return int(sysfile.read_text()) * 512
    except (OSError, ValueError):
        pass
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ProvisionError(f"{path}: cannot open block device: {e.strerror}") from None
    try:
        return struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    finally:
        os.close(fd)


def _block_family(rdev: tuple[int, int], sys_root: Path) -> set[tuple[int, int]]:
    """The device itself plus its partitions (from sysfs), and its holders' devices."""
    fam = {rdev}
    devdir = sys_root / "dev" / "block" / f"{rdev[0]}:{rdev[1]}"
    try:
        real = devdir.resolve(strict=True)
    except OSError:
        return fam
    for child in real.iterdir():
        if (child / "partition").exists() and (child / "dev").exists():
            maj, mnr = (child / "dev").read_text().strip().split(":")
            fam.add((int(maj), int(mnr)))
    return fam


def _loop_devices_backed_by(path: Path, sys_root: Path) -> list[tuple[str, tuple[int, int]]]:
    found = []
    try:
        real = os.path.realpath(path)
        for loop in sorted((sys_root / "block").glob("loop*")):
            bf = loop / "loop" / "backing_file"
            if bf.exists() and os.path.realpath(bf.read_text().strip()) == real:
                maj, mnr = (loop / "dev").read_text().strip().split(":")
                found.append((loop.name, (int(maj), int(mnr))))
    except OSError:
        pass
    return found


def mounted_reason(target: Target, proc_root: Path = Path("/proc"),
                   sys_root: Path = Path("/sys")) -> str | None:
    """Why TARGET must not be written (it or a partition of it is mounted), or None."""
    devs: set[tuple[int, int]] = set()
    names = {os.path.realpath(target.path)}
    if target.is_block and target.rdev:
        devs |= _block_family(target.rdev, sys_root)
    for loopname, rdev in _loop_devices_backed_by(target.path, sys_root):
        devs |= _block_family(rdev, sys_root)
        names.add(f"/dev/{loopname}")
    try:
        for line in (proc_root / "self" / "mountinfo").read_text().splitlines():
            fields = line.split()
            maj, mnr = fields[2].split(":")
            sep = fields.index("-")
            source = fields[sep + 2] if len(fields) > sep + 2 else ""
            if (int(maj), int(mnr)) in devs or source in names:
                return f"mounted at {fields[4]}"
    except OSError:
        pass
    try:
        for line in (proc_root / "mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0].startswith("/"):
                try:
                    src_real = os.path.realpath(fields[0])
                    st = os.stat(src_real)
                except OSError:
                    continue
                if src_real in names or (stat.S_ISBLK(st.st_mode) and
                                         (os.major(st.st_rdev), os.minor(st.st_rdev)) in devs):
                    return f"mounted at {fields[1]}"
    except OSError:
        pass
    if target.is_block and target.rdev:
        # a device held by device-mapper/md (e.g. an open LUKS mapping) is in use as well
        holders = sys_root / "dev" / "block" / f"{target.rdev[0]}:{target.rdev[1]}" / "holders"
        if holders.is_dir() and any(holders.iterdir()):
            return f"in use by {', '.join(p.name for p in holders.iterdir())}"
    return None


def partition_table(path: Path) -> str | None:
    """'gpt' or 'dos' if the target starts with a partition table, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096 + 512)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ProvisionError(f"{path}: cannot read target: {e.strerror}") from None
    if head[512:520] == b"EFI PART" or head[4096:4104] == b"EFI PART":
        return "gpt"
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        # an MBR boot signature with at least one non-empty partition entry
        entries = [head[446 + 16 * i: 462 + 16 * i] for i in range(4)]
        if any(e[4] != 0 for e in entries):
            return "dos"
    return None


def check_target(bm: bmapmod.BlockMap, target: Target, yes: bool,
                 proc_root: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> None:
    """Refuse to write (ProvisionError) unless TARGET is safe to overwrite. Only reads."""
    why = mounted_reason(target, proc_root, sys_root)
    if why:
        raise ProvisionError(f"{target.path}: target is {why}; unmount it (and all its partitions) first")
    if target.exists and target.size < bm.image_size:
        raise ProvisionError(f"{target.path}: target holds {target.size} bytes, smaller than the "
                             f"image ({bm.image_size} bytes); use a larger card")
    if target.is_block and not target.exists:
        raise ProvisionError(f"{target.path}: block device does not exist")
    table = partition_table(target.path) if target.exists else None
    if table and not yes:
        raise ProvisionError(f"{target.path}: target holds a {table} partition table; "
                             f"pass --yes to overwrite it")


def bmaptool_path() -> str:
    exe = shutil.which("bmaptool")
    if not exe:
        raise ProvisionError("bmaptool not found; install Debian's bmap-tools (deps/apt/provision.txt)")
    return exe


def write_image(image: Path, bmap_path: Path, target: Target) -> None:
    """Copy IMAGE's mapped blocks to TARGET with `bmaptool copy` (which also fsyncs)."""
    if not target.exists:
        # bmaptool creates and sizes a regular file target itself; make sure one exists so
        # that it is treated as a file and not as a missing /dev node
        target.path.touch()
    cmd = [bmaptool_path(), "-q", "copy", "--bmap", str(bmap_path), "--no-sig-verify",
           str(image), str(target.path)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit status {p.returncode}"
        raise ProvisionError(f"{target.path}: bmaptool copy failed: {msg}")


def _drop_cache(path: Path, is_block: bool) -> None:
    """Make the read-back hit the medium rather than the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if is_block:
            try:
                fcntl.ioctl(fd, BLKFLSBUF, 0)
            except OSError:
                pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class VerifyResult:
    ranges: int
    bytes: int
    seconds: float


def verify_target(bm: bmapmod.BlockMap, target: Path, is_block: bool = False,
                  chunk: int = 1 << 20) -> VerifyResult:
    """Read every mapped range back from TARGET and compare with the bmap's checksums."""
    t0 = time.monotonic()
    _drop_cache(target, is_block)
    total = 0
    checked = 0
    with open(target, "rb", buffering=0) as f:
        for r in bm.ranges:
            if r.checksum is None:
                continue
            start = r.first * bm.block_size
            end = min((r.last + 1) * bm.block_size, bm.image_size)
            h = hashlib.new(bm.checksum_type)
            f.seek(start)
            left = end - start
            while left:
                data = f.read(min(chunk, left))
                if not data:
                    raise ProvisionError(f"{target}: short read at byte {start + (end - start - left)} "
                                         f"while verifying blocks {r.first}-{r.last}")
                h.update(data)
                left -= len(data)
            if h.hexdigest() != r.checksum:
                raise ProvisionError(f"{target}: verification failed: blocks {r.first}-{r.last} "
                                     f"(bytes {start}-{end - 1}) read back differ from the image; "
                                     f"the medium is bad or was changed during the write")
            total += end - start
            checked += 1
    if checked == 0 and bm.ranges:
        raise ProvisionError(f"{bm.path}: bmap has no checksums; regenerate it with `bmaptool create`")
    return VerifyResult(checked, total, time.monotonic() - t0)


@dataclass(frozen=True)
class FlashResult:
    target: Path
    written_bytes: int
    write_seconds: float
    verify: VerifyResult


def flash(image: Path, target_path: Path, *, bmap_path: Path | None = None, yes: bool = False,
          after_write: Callable[[Path], None] | None = None) -> FlashResult:
    """Check, write, verify. ``after_write`` runs between write and read-back (tests use it
    to stand in for a card that loses data)."""
    image = Path(image)
    if not image.is_file():
        raise ProvisionError(f"{image}: image not found")
    bpath = bmapmod.find_for(image, bmap_path)
    bm = bmapmod.load(bpath)
    if image.stat().st_size != bm.image_size:
        raise ProvisionError(f"{image}: image is {image.stat().st_size} bytes but its bmap {bpath} "
                             f"says {bm.image_size}; the bmap belongs to another image")
    target = inspect_target(Path(target_path))
    check_target(bm, target, yes)
    t0 = time.monotonic()
    write_image(image, bpath, target)
    wsec = time.monotonic() - t0
    if after_write is not None:
        after_write(target.path)
    ver = verify_target(bm, target.path, target.is_block)
    return FlashResult(target.path, bm.mapped_bytes, wsec, ver)
