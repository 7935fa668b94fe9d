import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

MiB = 1 << 20


def make_image(d: Path, size_mib: int = 16) -> Path:
    """A GPT disk image with two partitions of random data and its bmap (real bmaptool)."""
    img = d / "disk.img"
    with open(img, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["sfdisk", "-q", str(img)], input="label: gpt\n,4M,L\n,,L\n", text=True, check=True)
    with open(img, "r+b") as f:
        f.seek(1 * MiB)  # inside partition 1
        f.write(os.urandom(512 * 1024))
        f.seek(6 * MiB)  # inside partition 2
        f.write(os.urandom(300 * 1024))
    subprocess.run(["bmaptool", "-q", "create", str(img), "-o", str(img) + ".bmap"], check=True)
    return img


def blank_card(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def kit():
    return SimpleNamespace(MiB=MiB, make_image=make_image, blank_card=blank_card)
