"""Disk writing and hashing on small real files (sfdisk on a file, no loop devices)."""
import hashlib
import os

from appliance.image.artefacts import hash_image
from appliance.image.disk import BlobPlacement, DiskLayout, Partition, write_disk
from appliance.image.inspect import partitions

L = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def layout(blobs=()):
    parts = (Partition("boot", 2048, 16384, L, "11111111-1111-4111-8111-111111111111", "LegacyBIOSBootable"),
             Partition("data", 18432, 4096, L, "22222222-2222-4222-8222-222222222222"))
    return DiskLayout("33333333-3333-4333-8333-333333333333", 18432 + 4096 + 2048, parts, blobs)


def test_write_disk_places_filesystems_and_keeps_holes(tmp_path):
    boot = tmp_path / "boot.fs"
    boot.write_bytes(b"B" * 4096 + bytes(4 << 20) + b"C" * 10)  # whole zero MiBs in the middle stay holes
    img = tmp_path / "disk.img"
    write_disk(layout(), img, {"boot": boot}, None)
    assert [p["name"] for p in partitions(img)] == ["boot", "data"]
    with open(img, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(4096) == b"B" * 4096
        f.seek(2048 * 512 + 4096 + (4 << 20))
        assert f.read(10) == b"C" * 10
    assert os.stat(img).st_blocks * 512 < 3 << 20  # 2 MiB of data chunks + GPT; the rest is holes


def test_hash_image_matches_plain_sha256(tmp_path):
    img = tmp_path / "disk.img"
    boot = tmp_path / "boot.fs"
    boot.write_bytes(os.urandom(300_000))
    write_disk(layout(), img, {"boot": boot}, None)
    whole, parts = hash_image(img, layout())
    data = img.read_bytes()
    assert whole == hashlib.sha256(data).hexdigest()
    assert parts["boot"] == hashlib.sha256(data[2048 * 512: 18432 * 512]).hexdigest()
    assert parts["data"] == hashlib.sha256(data[18432 * 512: 22528 * 512]).hexdigest()


def test_filesystem_larger_than_partition_is_refused(tmp_path):
    import pytest
    from appliance.image.errors import BuildError

    big = tmp_path / "boot.fs"
    big.write_bytes(b"x" * (16384 * 512 + 1))
    with pytest.raises(BuildError, match=r"partition 'boot': filesystem is 8388609 bytes but the board gives it 8388608"):
        write_disk(layout(), tmp_path / "disk.img", {"boot": big}, None)


def test_blobs_written_at_sectors(tmp_path):
    d = tmp_path / "blobs"
    d.mkdir()
    (d / "idb.img").write_bytes(b"\xaa" * 1000)
    img = tmp_path / "disk.img"
    write_disk(layout((BlobPlacement("idb.img", 64, 2048 * 512 - 64 * 512),)), img, {}, d)
    with open(img, "rb") as f:
        f.seek(64 * 512)
        assert f.read(1001) == b"\xaa" * 1000 + b"\0"
    assert [p["name"] for p in partitions(img)] == ["boot", "data"]  # GPT intact
