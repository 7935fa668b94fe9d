"""The boot partition is checked with fsck.fat before every mount (power cuts during updates).

Real dosfstools on a real FAT32 file system in an image file (the host has no vfat module, so
the file system is built and inspected with mkfs.fat and mtools, as the image builder does).
The damage is what a power cut in the middle of writing a slot's kernel leaves: a directory
entry gone while its clusters stay allocated.
"""
import shutil
import struct
import subprocess
import sys
import time

import pytest

from appliance.secure import slots

pytestmark = pytest.mark.skipif(shutil.which("fsck.fat") is None or shutil.which("mcopy") is None,
                                reason="needs dosfstools and mtools (scripts/install-system-deps.sh)")


def free_bytes(img) -> int:
    out = subprocess.run(["mdir", "-i", str(img), "::"], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1].split("bytes free")[0].replace(" ", ""))


def make_boot(tmp_path, size_mib=64):
    img = tmp_path / "boot.img"
    with open(img, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.fat", "-F", "32", "-n", "BOOT", str(img)], check=True, capture_output=True)
    (tmp_path / "Image").write_bytes(b"\x5a" * 3_000_000)
    (tmp_path / "bootstate.env").write_text("BOOT_ORDER=a b\nBOOT_a_LEFT=3\nBOOT_b_LEFT=3\n")
    subprocess.run(["mmd", "-i", str(img), "::b"], check=True)
    subprocess.run(["mcopy", "-i", str(img), str(tmp_path / "Image"), "::b/Image"], check=True)
    subprocess.run(["mcopy", "-i", str(img), str(tmp_path / "bootstate.env"), "::bootstate.env"], check=True)
    return img


def root_entries(img):
    """(offset, raw entry) of each entry in the root directory's first cluster."""
    with open(img, "rb") as f:
        bs = f.read(512)
        bps, spc, rsv, nfats = struct.unpack_from("<H", bs, 11)[0], bs[13], struct.unpack_from("<H", bs, 14)[0], bs[16]
        fat_sectors, root_cluster = struct.unpack_from("<I", bs, 36)[0], struct.unpack_from("<I", bs, 44)[0]
        off = (rsv + nfats * fat_sectors) * bps + (root_cluster - 2) * spc * bps
        f.seek(off)
        d = f.read(spc * bps)
    return [(off + i, d[i:i + 32]) for i in range(0, len(d), 32) if d[i] != 0]


def lose_directory(img, name=b"B          "):
    """Mark a directory entry deleted without freeing its clusters."""
    off = next(o for o, e in root_entries(img) if e[:11] == name)
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(b"\xe5")


def test_clean_partition_is_left_alone(tmp_path):
    img = make_boot(tmp_path)
    before = img.read_bytes()
    assert slots.check_boot(img) == ""
    assert img.read_bytes() == before


def test_stranded_clusters_are_reclaimed(tmp_path):
    img = make_boot(tmp_path)
    free_before = free_bytes(img)
    lose_directory(img)
    assert free_bytes(img) == free_before  # what the update's room check saw: space gone
    assert subprocess.run(["fsck.fat", "-n", str(img)], capture_output=True).returncode != 0

    said = slots.check_boot(img)
    assert "Reclaimed" in said and "\n" not in said
    assert subprocess.run(["fsck.fat", "-n", str(img)], capture_output=True).returncode == 0
    # fsck.fat -a salvages the chains to FSCKnnnn.REC files; the boot state survives as it was.
    names = subprocess.run(["mdir", "-b", "-i", str(img), "::"], capture_output=True, text=True).stdout.split()
    salvaged = [n for n in names if slots.SALVAGED.match(n.rsplit("/", 1)[-1])]
    assert salvaged, names
    assert subprocess.run(["mtype", "-i", str(img), "::bootstate.env"], capture_output=True,
                          text=True).stdout.startswith("BOOT_ORDER=a b")
    assert slots.check_boot(img) == ""  # idempotent: the second check finds nothing


def test_salvaged_chains_are_deleted_after_mount(tmp_path):
    # mounted_boot's step after the mount, on a directory standing in for the mounted partition.
    root = tmp_path / "boot"
    (root / "a").mkdir(parents=True)
    for name in ("FSCK0000.REC", "fsck0001.rec", "bootstate.env", "a/FSCK0002.REC", "FSCK.REC"):
        (root / name).write_text("x")
    assert slots.drop_salvaged(root) == ["FSCK0000.REC", "fsck0001.rec"]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "FSCK.REC", "a", "a/FSCK0002.REC", "bootstate.env"]


def test_dirty_flag_from_a_cut_is_cleared(tmp_path):
    img = make_boot(tmp_path)
    # FAT32 keeps "volume dirty" in the boot sector's reserved byte (Linux sets it while mounted);
    # a power cut leaves it set.
    with open(img, "r+b") as f:
        f.seek(0x41)
        f.write(b"\x01")
    said = slots.check_boot(img)
    assert said  # reported, not silently changed
    with open(img, "rb") as f:
        f.seek(0x41)
        assert f.read(1) == b"\x00"


def test_unrepairable_partition_is_a_one_line_error(tmp_path):
    img = make_boot(tmp_path)
    with open(img, "r+b") as f:
        f.write(b"\x00" * 512)  # boot sector gone: nothing for fsck.fat to work from
    with pytest.raises(slots.SlotError) as e:
        slots.check_boot(img)
    msg = str(e.value)
    assert str(img) in msg and "reflash" in msg and "\n" not in msg


HOLD = """
import sys, time
from pathlib import Path
from appliance.secure import slots
with slots.boot_lock("boot", Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(lock, seconds):
    # Another process, as the boot-time mark-good service is to `update install`.
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _use_boot(img, lock):
    # The host has no vfat module: the mount fails after the check, which is far enough here.
    try:
        with slots.mounted_boot(img, lock=lock):
            pass
    except slots.SlotError as e:
        assert "mounting" in str(e), e


def test_boot_partition_users_take_turns(tmp_path, capsys):
    img, lock = make_boot(tmp_path), tmp_path / "boot.lock"
    holder = _holder(lock, 1.5)
    t0 = time.monotonic()
    _use_boot(img, lock)
    waited = time.monotonic() - t0
    assert holder.wait(5) == 0
    assert waited >= 1.0, f"fsck/mount did not wait for the other user ({waited:.2f} s)"
    assert "waiting for another user of the boot partition" in capsys.readouterr().err


def test_lock_of_a_killed_user_is_released(tmp_path, capsys):
    # A power cut ends every holder; a killed `update install` must not wedge the next one.
    img, lock = make_boot(tmp_path), tmp_path / "boot.lock"
    holder = _holder(lock, 600)
    holder.kill()
    holder.wait(5)
    t0 = time.monotonic()
    _use_boot(img, lock)
    assert time.monotonic() - t0 < 30
