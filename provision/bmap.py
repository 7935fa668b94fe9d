"""Read a bmap file (bmap-tools' XML block map) to learn which block ranges an image maps.

Copying is bmaptool's job (flash.py runs ``bmaptool copy``); this module only parses the
map so that flash.py can read the written ranges back from the target and compare them with
the checksums the map records. bmaptool itself only checksums the *source* while reading it,
which is how it can report success over a card that silently drops writes.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .errors import ProvisionError


@dataclass(frozen=True)
class Range:
    first: int  # block numbers, inclusive
    last: int
    checksum: str | None

    @property
    def blocks(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class BlockMap:
    path: Path
    image_size: int
    block_size: int
    blocks_count: int
    mapped_blocks: int
    checksum_type: str
    ranges: tuple[Range, ...]

    @property
    def mapped_bytes(self) -> int:
        return sum(min(r.blocks * self.block_size, self.image_size - r.first * self.block_size)
                   for r in self.ranges)


_CHECKSUMS = {"sha256": 64, "sha1": 40}


def _text(root: ET.Element, tag: str, path: Path) -> str:
    el = root.find(tag)
    if el is None or el.text is None or not el.text.strip():
        raise ProvisionError(f"{path}: bmap has no <{tag}>; regenerate it with `bmaptool create`")
    return el.text.strip()


def _int(root: ET.Element, tag: str, path: Path) -> int:
    raw = _text(root, tag, path)
    try:
        return int(raw)
    except ValueError:
        raise ProvisionError(f"{path}: bmap <{tag}> is {raw!r}, not an integer") from None


def load(path: Path) -> BlockMap:
    """Parse and self-check a bmap file (format 1.x or 2.x)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ProvisionError(f"{path}: cannot read bmap: {e.strerror}") from None
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise ProvisionError(f"{path}: bmap is not valid XML ({e})") from None
    if root.tag != "bmap":
        raise ProvisionError(f"{path}: not a bmap file (root element <{root.tag}>)")
    version = root.get("version", "")
    major = version.split(".")[0]
    if major not in ("1", "2"):
        raise ProvisionError(f"{path}: bmap version {version!r} is not supported (1.x or 2.x)")
    ctype = "sha1" if major == "1" else _text(root, "ChecksumType", path)
    if ctype not in _CHECKSUMS:
        raise ProvisionError(f"{path}: bmap checksum type {ctype!r} is not supported")
    if major == "2":
        # The file checksum is computed with its own value replaced by zeros.
        declared = _text(root, "BmapFileChecksum", path)
        zeroed = raw.replace(declared.encode(), b"0" * len(declared), 1)
        if hashlib.new(ctype, zeroed).hexdigest() != declared:
            raise ProvisionError(f"{path}: bmap file checksum mismatch; the bmap is corrupt or edited")
    bm = root.find("BlockMap")
    if bm is None:
        raise ProvisionError(f"{path}: bmap has no <BlockMap>")
    ranges = []
    for el in bm.findall("Range"):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", el.text or "")
        if not m:
            raise ProvisionError(f"{path}: bad bmap range {el.text!r}")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        if last < first:
            raise ProvisionError(f"{path}: bad bmap range {el.text.strip()!r} (end before start)")
        ck = el.get("chksum") or el.get("sha1")
        ranges.append(Range(first, last, ck.strip() if ck else None))
    bmap = BlockMap(path=path, image_size=_int(root, "ImageSize", path),
                    block_size=_int(root, "BlockSize", path),
                    blocks_count=_int(root, "BlocksCount", path),
                    mapped_blocks=_int(root, "MappedBlocksCount", path),
                    checksum_type=ctype, ranges=tuple(ranges))
    if sum(r.blocks for r in ranges) != bmap.mapped_blocks:
        raise ProvisionError(f"{path}: bmap ranges cover {sum(r.blocks for r in ranges)} blocks "
                             f"but <MappedBlocksCount> says {bmap.mapped_blocks}")
    if ranges and (ranges[-1].last + 1) * bmap.block_size > bmap.image_size + bmap.block_size - 1:
        raise ProvisionError(f"{path}: bmap range {ranges[-1].first}-{ranges[-1].last} lies past "
                             f"the image size {bmap.image_size}")
    return bmap


def find_for(image: Path, explicit: Path | None = None) -> Path:
    """The bmap for IMAGE: the one given, else IMAGE.bmap or IMAGE-without-suffix.bmap."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise ProvisionError(f"{explicit}: bmap file not found")
        return Path(explicit)
    image = Path(image)
    for cand in (image.with_name(image.name + ".bmap"), image.with_suffix(".bmap")):
        if cand.is_file():
            return cand
    raise ProvisionError(f"{image}: no block map next to it ({image.name}.bmap); create one with "
                         f"`bmaptool create {image} -o {image}.bmap` or pass --bmap")
