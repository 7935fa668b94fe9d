"""Stage 5: the partitioned disk image. Layout planning is pure; writing is separate."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .config import BuildConfig
from .errors import BuildError
from .filesystems import stable_uuid

SECTOR = 512
MIB_SECTORS = (1 << 20) // SECTOR
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


@dataclass(frozen=True)
class Partition:
    label: str
    start: int          # sectors
    size: int           # sectors
    type_guid: str
    uuid: str
    attrs: str = ""

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def nbytes(self) -> int:
        return self.size * SECTOR


@dataclass(frozen=True)
class BlobPlacement:
    file: str
    sector: int
    max_bytes: int


@dataclass(frozen=True)
class DiskLayout:
    disk_guid: str
    total_sectors: int
    partitions: tuple[Partition, ...]
    blobs: tuple[BlobPlacement, ...]

    def by_label(self, label: str) -> Partition:
        return next(p for p in self.partitions if p.label == label)

    @property
    def nbytes(self) -> int:
        return self.total_sectors * SECTOR


def plan_disk(cfg: BuildConfig) -> DiskLayout:
    d = cfg.board.disk
    name = cfg.image_name
    boot_type, boot_attrs = (ESP, "") if cfg.board.boot == "uefi" else (LINUX_FS, "LegacyBIOSBootable")
    # The data partition is last so that it can grow into the rest of the card on first boot.
    sizes = [("boot", d.boot_mib, boot_type, boot_attrs), ("root-a", d.root_mib, LINUX_FS, ""),
             ("root-b", d.root_mib, LINUX_FS, ""), ("data", d.data_mib, LINUX_FS, "")]
    start = d.first_partition_mib * MIB_SECTORS
    parts = []
    for label, mib, type_guid, attrs in sizes:
        size = mib * MIB_SECTORS
        parts.append(Partition(label, start, size, type_guid, stable_uuid(name, "part", label), attrs))
        start += size
    # 1 MiB tail holds the backup GPT (33 sectors) with room to spare.
    total = start + MIB_SECTORS
    blobs = tuple(BlobPlacement(b.file, b.sector, b.max_bytes) for b in cfg.board.bootloader.blobs) \
        if (cfg.board.bootloader and cfg.bootloader_dir) else ()
    return DiskLayout(stable_uuid(name, "disk"), total, tuple(parts), blobs)


def sfdisk_script(layout: DiskLayout) -> str:
    lines = ["label: gpt", f"label-id: {layout.disk_guid}", "unit: sectors", "sector-size: 512",
             "first-lba: 34", f"last-lba: {layout.total_sectors - 34}", ""]
    for p in layout.partitions:
        entry = f"start={p.start}, size={p.size}, type={p.type_guid}, uuid={p.uuid}, name=\"{p.label}\""
        if p.attrs:
            entry += f", attrs=\"{p.attrs}\""
        lines.append(entry)
    return "\n".join(lines) + "\n"


def copy_sparse(src: Path, dst_fd: int, offset: int, chunk: int = 1 << 20) -> None:
    """Write src into the disk at offset, leaving all-zero chunks as holes (smaller bmap)."""
    zero = bytes(chunk)
    with open(src, "rb") as f:
        pos = offset
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            if buf != zero[: len(buf)]:
                os.pwrite(dst_fd, buf, pos)
            pos += len(buf)


def write_disk(layout: DiskLayout, out: Path, part_images: dict[str, Path], bootloader_dir: Path | None) -> None:
    with open(out, "wb") as f:
        f.truncate(layout.nbytes)
    r = subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(out)],
                       input=sfdisk_script(layout), capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"sfdisk failed on {out}: {r.stderr.strip()[:300]}")
    fd = os.open(out, os.O_WRONLY)
    try:
        for label, img in part_images.items():
            p = layout.by_label(label)
            size = img.stat().st_size
            if size > p.nbytes:
                raise BuildError(
                    f"partition {label!r}: filesystem is {size} bytes but the board gives it "
                    f"{p.nbytes} (raise disk.{label.split('-')[0]}_mib in the board file)")
            copy_sparse(img, fd, p.offset)
        for b in layout.blobs:
            data = (bootloader_dir / b.file).read_bytes()
            if len(data) > b.max_bytes:
                raise BuildError(f"{bootloader_dir / b.file}: {len(data)} bytes, more than the {b.max_bytes} it may use")
            os.pwrite(fd, data, b.sector * SECTOR)
        os.fsync(fd)
    finally:
        os.close(fd)
