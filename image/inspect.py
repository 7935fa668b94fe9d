"""Read a built image without mounting it (loop mounts do not work on every build host)."""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from .errors import BuildError


def partitions(image: Path) -> list[dict]:
    """GPT entries as sfdisk reports them: name, start, size (sectors), type, uuid, attrs."""
    r = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"{image}: no readable partition table ({r.stderr.strip()[:200]})")
    return json.loads(r.stdout)["partitiontable"]["partitions"]


def partition_bytes(image: Path, label: str) -> bytes:
    for p in partitions(image):
        if p.get("name") == label:
            with open(image, "rb") as f:
                f.seek(p["start"] * 512)
                return f.read(p["size"] * 512)
    raise BuildError(f"{image}: no partition labelled {label!r}")


def read_ext4_file(image: Path, label: str, path: str) -> bytes:
    """Contents of `path` inside the ext4 partition `label` (via debugfs, no mount)."""
    with tempfile.NamedTemporaryFile(suffix=".fs") as fs, tempfile.TemporaryDirectory() as d:
        fs.write(partition_bytes(image, label))
        fs.flush()
        out = Path(d) / "out"
        r = subprocess.run(["debugfs", "-R", f"dump -p {path} {out}", fs.name], capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            raise BuildError(f"{image}: partition {label!r} has no {path} ({r.stderr.strip()[-200:]})")
        return out.read_bytes()


def read_vfat_file(image: Path, label: str, path: str) -> bytes:
    """Contents of `path` inside the FAT partition `label` (via mtools, no mount)."""
    for p in partitions(image):
        if p.get("name") == label:
            r = subprocess.run(["mtype", "-i", f"{image}@@{p['start'] * 512}", f"::{path}"], capture_output=True,
                               env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
            if r.returncode != 0:
                raise BuildError(f"{image}: partition {label!r} has no {path} "
                                 f"({r.stderr.decode(errors='replace').strip()[-200:]})")
            return r.stdout
    raise BuildError(f"{image}: no partition labelled {label!r}")
