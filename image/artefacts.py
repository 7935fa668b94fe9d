"""Stage 6: what a user flashes and audits: the image, its block map, manifest and SBOM.

Every artefact is written under a temp name and renamed only once all of them exist, so an
interrupted build never leaves a finished-looking image next to a stale manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from .disk import DiskLayout
from .errors import BuildError

CHUNK = 4 << 20


def data_ranges(f, size: int):
    """(start, end, is_data) runs of a sparse file, via SEEK_DATA/SEEK_HOLE."""
    fd, pos = f.fileno(), 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            data = size
        if data > pos:
            yield pos, data, False
        if data >= size:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, hole, True
        pos = hole


def hash_image(img: Path, layout: DiskLayout) -> tuple[str, dict[str, str]]:
    """sha256 of the whole image and of each partition's full extent, in one pass that
    reads only the mapped data (holes are hashed from a zero buffer)."""
    whole = hashlib.sha256()
    parts = [(p.offset, p.offset + p.nbytes, p.label, hashlib.sha256()) for p in layout.partitions]
    zero = bytes(CHUNK)
    size = img.stat().st_size
    with open(img, "rb") as f:
        for start, end, is_data in data_ranges(f, size):
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                if is_data:
                    f.seek(pos)
                    buf = f.read(n)
                else:
                    buf = zero[:n] if n < CHUNK else zero
                whole.update(buf)
                for lo_p, hi_p, _, h in parts:
                    lo, hi = max(lo_p, pos), min(hi_p, pos + n)
                    if lo < hi:
                        h.update(memoryview(buf)[lo - pos: hi - pos])
                pos += n
    return whole.hexdigest(), {label: h.hexdigest() for _, _, label, h in parts}


def start_bmap(img: Path, out: Path) -> subprocess.Popen:
    """bmaptool runs beside our own hashing of the image (both mostly wait on reads)."""
    return subprocess.Popen(["bmaptool", "create", "-o", str(out), str(img)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_bmap(proc: subprocess.Popen) -> None:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise BuildError(f"bmaptool create failed: {(err or out).strip()[:300]}")


def bmap_mapped_bytes(bmap: Path) -> int:
    import xml.etree.ElementTree as ET

    root = ET.parse(bmap).getroot()
    return int(root.findtext("MappedBlocksCount")) * int(root.findtext("BlockSize"))


def sbom(name: str, version: str, packages: list[dict], epoch: int) -> dict:
    """SPDX 2.3 document listing every Debian package in the image."""
    from datetime import datetime, timezone

    created = datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{name}-{version}",
        "documentNamespace": f"https://appliance.invalid/spdx/{name}/{version}",
        "creationInfo": {"created": created, "creators": ["Tool: appliance-build-image"]},
        "packages": [
            {
                "SPDXID": f"SPDXRef-deb-{i}",
                "name": p["name"],
                "versionInfo": p["version"],
                "supplier": "Organization: Debian",
                "downloadLocation": "NOASSERTION",
                "licenseConcluded": "NOASSERTION",
                "copyrightText": f"see /usr/share/doc/{p['name']}/copyright",
                "externalRefs": [{
                    "referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                    "referenceLocator": f"pkg:deb/debian/{p['name']}@{p['version']}?arch={p['arch']}",
                }],
            }
            for i, p in enumerate(packages)
        ],
    }


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(4 << 20):
            h.update(buf)
    return h.hexdigest()
