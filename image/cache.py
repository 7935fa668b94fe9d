"""Content-addressed cache for slow build stages (rootfs tarballs, builder chroots, bundles).

A stage's output lives at CACHE/<stage>/<key>/ where key hashes every input of the stage;
an entry is published by renaming a finished temp directory, so a killed build never leaves
an entry that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("APPLIANCE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "appliance"


def inputs_hash(inputs: object) -> str:
    """Stable hash of JSON-able inputs (dict key order does not matter)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """Hash of a directory's file names and contents (for template and source trees)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(file_digest(p).encode())
    return h.hexdigest()


# Entries kept per stage, most recently used first; a stage's entries are 0.1-1 GB each.
KEEP = {"rootfs": 4, "base": 6, "agent-bundle": 6, "bundle-chroot": 4, "bundle-builder": 4}
DEFAULT_KEEP = 6


def lookup(stage: str, key: str) -> Path | None:
    entry = cache_root() / stage / key
    marker = entry / ".complete"
    if not marker.exists():
        return None
    try:
        os.utime(marker)  # recently used: pruning keeps it
    except OSError:
        pass
    return entry


def prune(stage: str, keep: int | None = None) -> list[str]:
    """Drop the least recently used complete entries beyond `keep`; returns the keys removed."""
    keep = KEEP.get(stage, DEFAULT_KEEP) if keep is None else keep
    parent = cache_root() / stage
    if not parent.is_dir():
        return []
    entries = sorted(
        (p for p in parent.iterdir() if (p / ".complete").exists()),
        key=lambda p: (p / ".complete").stat().st_mtime, reverse=True,
    )
    removed = []
    for p in entries[keep:]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def cached(stage: str, key: str, produce: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return (entry dir, hit). On a miss, produce(tmpdir) fills a temp dir that is then
    published atomically."""
    hit = lookup(stage, key)
    if hit is not None:
        return hit, True
    parent = cache_root() / stage
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=parent))
    try:
        produce(tmp)
        (tmp / ".complete").write_text(key + "\n")
        final = parent / key
        done = lookup(stage, key)
        if done is not None:  # a concurrent build published the same entry first: use that one
            shutil.rmtree(tmp, ignore_errors=True)
            return done, False
        if final.exists():  # an incomplete leftover from a killed run
            shutil.rmtree(final)
        os.rename(tmp, final)
        prune(stage)
        return final, False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
