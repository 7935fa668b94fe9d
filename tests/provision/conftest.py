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


@pytest.fixture
def postgres():
    """A real PostgreSQL server (Debian's postgresql 15) for this test: its own cluster in a
    temp dir, run as the postgres user on a free loopback port; yields its URL."""
    import shutil
    import socket
    import tempfile

    bindir = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                 check=True).stdout.strip()) if shutil.which("pg_config") else None
    initdb = str(bindir / "initdb") if bindir and (bindir / "initdb").exists() else "initdb"
    pg_ctl = str(bindir / "pg_ctl") if bindir and (bindir / "pg_ctl").exists() else "pg_ctl"
    d = Path(tempfile.mkdtemp(prefix="provision-pg-"))  # not under tmp_path: postgres must reach it
    shutil.chown(d, "postgres", "postgres")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_pg + [initdb, "-D", str(d / "data"), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run(as_pg + [pg_ctl, "-D", str(d / "data"), "-l", str(d / "log"), "-w", "-t", "60", "-o",
                            f"-k {d} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_pg + [pg_ctl, "-D", str(d / "data"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
