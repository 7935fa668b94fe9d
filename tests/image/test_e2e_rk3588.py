"""e2e: an rk3588 (ROCK 5B) image with vendor-style boot blobs, checked from the image file.

No RK3588 here, so nothing boots: the test reads the disk as the board's boot ROM and U-Boot
would (raw sectors, GPT, the ext4 boot partition). Dummy blobs stand in for the vendor's
idbloader.img/u-boot.itb; only their placement is under test. Shares the arm64 rootfs cache
with qemu-arm64, so warm it costs about a minute.
"""
import json
import os

import pytest

from appliance.image.inspect import partitions, read_vfat_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rock5b(tmp_path_factory):
    from appliance.image.build import build
    from appliance.image.config import make_config

    d = tmp_path_factory.mktemp("rock5b")
    blobs = d / "blobs"
    blobs.mkdir()
    idb, itb = os.urandom(200 * 1024), os.urandom(900 * 1024)
    (blobs / "idbloader.img").write_bytes(idb)
    (blobs / "u-boot.itb").write_bytes(itb)
    cfg = make_config("rk3588", variant="rock-5b", out_dir=d / "out", bootloader_dir=blobs,
                      boards_dir=REPO / "boards", with_agent=False)
    return build(cfg), idb, itb


def test_blobs_at_rockchip_offsets(rock5b):
    res, idb, itb = rock5b
    with open(res.image, "rb") as f:
        f.seek(64 * 512)
        assert f.read(len(idb)) == idb
        f.seek(16384 * 512)
        assert f.read(len(itb)) == itb
    m = json.loads(res.manifest.read_text())
    assert m["bootloader"] == [{"file": "idbloader.img", "sector": 64}, {"file": "u-boot.itb", "sector": 16384}]


def test_gpt_labels_and_sizes(rock5b):
    res, _, _ = rock5b
    parts = partitions(res.image)
    assert [p["name"] for p in parts] == ["boot", "root-a", "root-b", "data"]
    assert parts[0]["start"] == 16 * 2048          # partitions start after 16 MiB
    sizes = {p["name"]: p["size"] * 512 // 2**20 for p in parts}
    assert sizes == {"boot": 512, "root-a": 1024, "root-b": 1024, "data": 256}
    assert "LegacyBIOSBootable" in parts[0].get("attrs", "")


def test_boot_script_names_dtb_console_and_root(rock5b):
    res, _, _ = rock5b
    conf = read_vfat_file(res.image, "boot", "/boot.cmd").decode()
    assert "${appliance_slot}/dtbs/rockchip/rk3588-rock-5b.dtb" in conf
    assert "console=ttyS2,1500000" in conf
    assert read_vfat_file(res.image, "boot", "/boot.scr")[:4] == bytes.fromhex("27051956")
    slot = read_vfat_file(res.image, "boot", "/a/slot.env").decode()
    assert "root=PARTLABEL=root-a" in slot and "rootfstype=erofs" in slot
    dtb = read_vfat_file(res.image, "boot", "/a/dtbs/rockchip/rk3588-rock-5b.dtb")
    assert dtb[:4] == bytes.fromhex("d00dfeed")   # a real flattened device tree
    board = res.manifest_data
    assert board["variant"] == "rock-5b" and board["profile"] == "production"
