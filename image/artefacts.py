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


def hash_image(img: Path, layout: DiskLayout) -> tuple[str, dict[str, str]]:
    """sha256 of the whole image and of each partition's full extent, in one read."""
    whole = hashlib.sha256()
    parts = {p.label: (p.offset, p.offset + p.nbytes, hashlib.sha256()) for p in layout.partitions}
    with open(img, "rb") as f:
        pos = 0
        while buf := f.read(CHUNK):
            whole.update(buf)
            end = pos + len(buf)
            for start, stop, h in parts.values():
                lo, hi = max(start, pos), min(stop, end)
                if lo < hi:
                    h.update(buf[lo - pos: hi - pos])
            pos = end
    return whole.hexdigest(), {k: v[2].hexdigest() for k, v in parts.items()}


def make_bmap(img: Path, out: Path) -> None:
    r = subprocess.run(["bmaptool", "create", "-o", str(out), str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"bmaptool create failed: {(r.stderr or r.stdout).strip()[:300]}")


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
