"""Flash: real bmaptool, real sfdisk-made images; targets are files standing in for cards
(a real card/USB disk cannot exist here). The mount check runs against this host's real
/proc/self/mountinfo with its real root disk."""

import os
import subprocess
from pathlib import Path

import pytest

from appliance.provision import bmap as bmapmod
from appliance.provision import flash as fl
from appliance.provision.cli import main
from appliance.provision.errors import ProvisionError

MiB = 1 << 20


def blank_card(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def image(tmp_path, kit):
    return kit.make_image(tmp_path)




def test_bmap_parsed_and_self_checked(image, tmp_path):
    bm = bmapmod.load(Path(str(image) + ".bmap"))
    assert bm.image_size == 16 * MiB and bm.block_size == 4096
    assert bm.checksum_type == "sha256"
    assert 0 < bm.mapped_bytes < bm.image_size // 4
    assert sum(r.blocks for r in bm.ranges) == bm.mapped_blocks
    edited = tmp_path / "edited.bmap"
    edited.write_text(Path(str(image) + ".bmap").read_text().replace("<ImageSize> ", "<ImageSize> 1"))
    with pytest.raises(ProvisionError, match="checksum mismatch"):
        bmapmod.load(edited)


def test_flash_to_file_writes_and_verifies(image, tmp_path):
    card = blank_card(tmp_path / "card", 32 * MiB)
    res = fl.flash(image, card)
    assert res.verify.ranges >= 3
    with open(image, "rb") as a, open(card, "rb") as b:
        assert a.read() == b.read(16 * MiB)


def test_verification_reads_back_and_catches_a_bad_card(image, tmp_path):
    card = blank_card(tmp_path / "card", 16 * MiB)

    def bad_card(path):  # the card "loses" a write: one byte inside a mapped range flips
        with open(path, "r+b") as f:
            f.seek(6 * MiB + 1000)
            b = f.read(1)
            f.seek(6 * MiB + 1000)
            f.write(bytes([b[0] ^ 0xFF]))

    with pytest.raises(ProvisionError, match=r"verification failed: blocks \d+-\d+"):
        fl.flash(image, card, after_write=bad_card)


def test_corruption_outside_mapped_blocks_is_not_flagged(image, tmp_path):
    card = blank_card(tmp_path / "card", 16 * MiB)
    bm = bmapmod.load(Path(str(image) + ".bmap"))
    mapped = {b for r in bm.ranges for b in range(r.first, r.last + 1)}
    hole = next(b for b in range(bm.blocks_count) if b not in mapped)

    def scribble(path):
        with open(path, "r+b") as f:
            f.seek(hole * bm.block_size)
            f.write(b"junk")

    fl.flash(image, card, after_write=scribble)


def test_refuses_target_smaller_than_image(image, tmp_path, capsys):
    card = blank_card(tmp_path / "small", 8 * MiB)
    assert main(["flash", str(image), "--to", str(card)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("provision: error: ") and "smaller than the image" in err
    assert len(err.strip().splitlines()) == 1
    assert card.stat().st_size == 8 * MiB and card.read_bytes() == b"\0" * (8 * MiB)


def test_partition_table_needs_yes(image, tmp_path, capsys):
    card = blank_card(tmp_path / "card", 16 * MiB)
    subprocess.run(["sfdisk", "-q", str(card)], input="label: dos\n,,L\n", text=True, check=True)
    before = card.read_bytes()
    assert main(["flash", str(image), "--to", str(card)]) == 1
    assert "dos partition table; pass --yes" in capsys.readouterr().err
    assert card.read_bytes() == before
    assert main(["flash", str(image), "--to", str(card), "--yes"]) == 0
    assert "verified" in capsys.readouterr().out
    assert fl.partition_table(card) == "gpt"


def test_refuses_mounted_block_device():
    # the disk holding this host's / is mounted; check_target only reads
    st = os.stat("/")
    maj, mnr = os.major(st.st_dev), os.minor(st.st_dev)
    dev = Path(f"/dev/block/{maj}:{mnr}")
    if not dev.exists():
        dev = next(p for p in Path("/dev").iterdir()
                   if p.is_block_device() and os.stat(p).st_rdev == st.st_dev)
    target = fl.inspect_target(dev)
    assert target.is_block
    bm = bmapmod.BlockMap(Path("x.bmap"), 4096, 4096, 1, 1, "sha256", ())
    with pytest.raises(ProvisionError, match="mounted at /"):
        fl.check_target(bm, target, yes=True)


def test_refuses_file_listed_as_mount_source(image, tmp_path):
    # a mount whose source is the target file itself (e.g. `mount -o loop card /mnt`)
    card = blank_card(tmp_path / "card", 16 * MiB)
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        f"27 1 254:0 / / rw - ext4 /dev/vda rw\n99 27 7:3 / /mnt/card rw - vfat {card} rw\n")
    (proc / "mounts").write_text("")
    bm = bmapmod.load(Path(str(image) + ".bmap"))
    with pytest.raises(ProvisionError, match="mounted at /mnt/card"):
        fl.check_target(bm, fl.inspect_target(card), yes=True, proc_root=proc)


def test_clear_errors_for_missing_things(tmp_path, capsys):
    assert main(["flash", str(tmp_path / "nope.img"), "--to", str(tmp_path / "c")]) == 1
    assert "image not found" in capsys.readouterr().err
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * 4096)
    assert main(["flash", str(img), "--to", str(tmp_path / "c")]) == 1
    assert "no block map next to it" in capsys.readouterr().err


def test_flash_to_new_file(image, tmp_path):
    out = tmp_path / "new.img"
    fl.flash(image, out)
    assert out.read_bytes() == image.read_bytes()


@pytest.fixture
def loopdev(tmp_path):
    backing = blank_card(tmp_path / "loopcard", 24 * MiB)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield Path(dev), backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_flash_to_real_block_device(image, loopdev, capsys):
    # a loop device is a real block device node (BLKGETSIZE64, O_EXCL, BLKFLSBUF paths)
    dev, backing = loopdev
    t = fl.inspect_target(dev)
    assert t.is_block and t.size == 24 * MiB
    assert main(["flash", str(image), "--to", str(dev)]) == 0
    # now it holds the image's GPT: a second flash wants --yes
    assert main(["flash", str(image), "--to", str(dev)]) == 1
    assert "gpt partition table; pass --yes" in capsys.readouterr().err
    assert main(["flash", str(image), "--to", str(dev), "--yes"]) == 0
    with open(image, "rb") as a, open(backing, "rb") as b:
        assert a.read() == b.read(16 * MiB)
