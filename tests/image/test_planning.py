"""Pure planning: rootfs inputs and cache key, disk layout, module selection, templates."""
from pathlib import Path

import pytest

from appliance.image.config import make_config
from appliance.image.customise import finish_boot, split_modules, template_context
from appliance.image.disk import MIB_SECTORS, plan_disk, sfdisk_script
from appliance.image.rootfs import plan_rootfs
from appliance.image.templates_render import render_tree

REPO = Path(__file__).resolve().parents[2]
B = REPO / "boards"


def cfg(board="qemu-arm64", **kw):
    return make_config(board, boards_dir=B, **kw)


def test_rootfs_key_ignores_profile_and_templates():
    # Profiles and templates are applied after the cached stage: they must not change its key.
    assert plan_rootfs(cfg(profile="debug")).key() == plan_rootfs(cfg(profile="production")).key()


def test_rootfs_key_tracks_its_inputs():
    base = plan_rootfs(cfg())
    other_mirror = plan_rootfs(cfg(mirror="http://mirror.invalid/debian"))
    amd = plan_rootfs(cfg("qemu-amd64"))
    assert len({base.key(), other_mirror.key(), amd.key()}) == 3
    assert "linux-image-arm64" in base.packages and "linux-image-amd64" in amd.packages


def test_mmdebstrap_argv_writes_initramfs_modules():
    argv = plan_rootfs(cfg()).mmdebstrap_argv(Path("/x/rootfs.tar"))
    assert argv[:2] == ["mmdebstrap", "--mode=root"] and "--arch=arm64" in argv
    hook = next(a for a in argv if a.startswith("--setup-hook="))
    assert "erofs" in hook and "virtio_blk" in hook and "modules.d/appliance.conf" in hook
    assert argv[-3:] == ["trixie", "/x/rootfs.tar", "http://deb.debian.org/debian"]


def test_disk_layout_qemu():
    lay = plan_disk(cfg())
    labels = [p.label for p in lay.partitions]
    assert labels == ["boot", "root-a", "root-b", "data"]
    assert lay.partitions[0].start == MIB_SECTORS  # 1 MiB aligned
    for a, b in zip(lay.partitions, lay.partitions[1:]):
        assert a.start + a.size == b.start  # contiguous, no overlap
        assert b.start % MIB_SECTORS == 0
    assert lay.by_label("root-a").size == lay.by_label("root-b").size == 1024 * MIB_SECTORS
    # room for the backup GPT after the last partition
    last = lay.partitions[-1]
    assert lay.total_sectors - (last.start + last.size) >= 33
    assert lay.by_label("boot").attrs == "LegacyBIOSBootable"


def test_disk_layout_rk3588_leaves_room_for_blobs(tmp_path):
    (tmp_path / "idbloader.img").write_bytes(b"i" * 4096)
    (tmp_path / "u-boot.itb").write_bytes(b"u" * 4096)
    lay = plan_disk(cfg("rk3588", variant="rock-5b", bootloader_dir=tmp_path))
    assert lay.partitions[0].start == 16 * MIB_SECTORS
    assert [(b.file, b.sector) for b in lay.blobs] == [("idbloader.img", 64), ("u-boot.itb", 16384)]
    for b in lay.blobs:
        assert b.sector * 512 + b.max_bytes <= lay.partitions[0].offset


def test_disk_uuids_are_stable_and_distinct():
    a, b = plan_disk(cfg()), plan_disk(cfg())
    assert a == b
    assert len({p.uuid for p in a.partitions}) == 4
    assert plan_disk(cfg("qemu-amd64")).partitions[0].type_guid.startswith("C12A7328")  # ESP on UEFI


def test_sfdisk_script():
    s = sfdisk_script(plan_disk(cfg()))
    assert s.startswith("label: gpt\n")
    assert 'name="root-b"' in s and 'attrs="LegacyBIOSBootable"' in s


@pytest.mark.parametrize("rel,kept", [
    ("fs/erofs/erofs.ko.xz", True),
    ("drivers/block/virtio_blk.ko.xz", True),
    ("drivers/gpu/drm/amd/amdgpu/amdgpu.ko.xz", False),
    ("sound/core/snd.ko.xz", False),
    ("drivers/md/dm-verity.ko.xz", True),
])
def test_module_selection(rel, kept):
    keep = cfg().board.modules.keep
    k, d = split_modules([rel], keep)
    assert (rel in k) == kept and (rel in d) != kept


def _render(tmp_path, **kw):
    c = cfg(**kw)
    ctx = template_context(c, {"name": c.image_name})
    root = tmp_path / "root"
    written = render_tree("rootfs", root, ctx)
    boot = tmp_path / "boot"
    boot.mkdir()
    finish_boot(c, boot, ctx, {"roothash": "ab" * 32, "hash_offset": 4096})
    return root, boot, written


def test_templates_production(tmp_path):
    root, boot, written = _render(tmp_path)
    fstab = (root / "etc/fstab").read_text()
    assert "PARTLABEL=data" in fstab and "/data" in fstab and "x-systemd.growfs" in fstab
    assert (root / "etc/hostname").read_text().strip() == "qemu-arm64"
    # production: no autologin drop-in at all
    assert "etc/systemd/system/serial-getty@.service.d/autologin.conf" not in written
    slot = (boot / "a/slot.env").read_text()
    assert slot.startswith("slot_args=root=PARTLABEL=root-a ") and "rootfstype=erofs" in slot and " ro " in slot
    assert f"appliance.verity={'ab' * 32}:4096" in slot and "appliance.slot=a" in slot
    cmd = (boot / "boot.cmd").read_text()
    assert "console=ttyAMA0,115200" in cmd and "fdt_addr_r" not in cmd  # QEMU provides its own DT
    assert "${fdtcontroladdr}" in cmd
    # A fresh image boots slot a only: slot b is empty until the first update.
    assert (boot / "bootstate.env").read_text().split() == ["BOOT_ORDER=a", "BOOT_a_LEFT=3", "BOOT_b_LEFT=0"]
    scr = (boot / "boot.scr").read_bytes()
    assert scr[:4] == bytes.fromhex("27051956") and b"appliance A/B boot" in scr[:64]
    assert cmd.encode() in scr  # the compiled script carries the text unchanged


def test_templates_debug_adds_serial_autologin(tmp_path):
    root, _, written = _render(tmp_path, profile="debug")
    conf = (root / "etc/systemd/system/serial-getty@.service.d/autologin.conf").read_text()
    assert "--login-program /bin/bash" in conf and "--skip-login" in conf


@pytest.mark.parametrize("profile", ["production", "debug"])
def test_templates_emergency_and_rescue_modes(tmp_path, profile):
    """production reboots out of emergency/rescue mode (the boot counter then spends a try);
    debug gives the locked root a shell there instead (tests/image/test_e2e_emergency.py boots both)."""
    root, _, _ = _render(tmp_path, profile=profile)
    for mode in ("emergency", "rescue"):
        conf = (root / f"etc/systemd/system/{mode}.service.d/appliance.conf").read_text()
        if profile == "production":
            assert "SuccessAction=reboot" in conf and "FailureAction=reboot" in conf
            assert f"appliance: {mode} mode" in conf and "\nExecStart=\n" in conf
            assert "SULOGIN_FORCE" not in conf
        else:
            assert "Environment=SYSTEMD_SULOGIN_FORCE=1" in conf and "reboot" not in conf.split("[Service]")[1]


def test_templates_rk3588_boot_script(tmp_path):
    root, boot, _ = _render(tmp_path, board="rk3588", variant="rock-5b")
    cmd = (boot / "boot.cmd").read_text()
    assert "${appliance_slot}/dtbs/rockchip/rk3588-rock-5b.dtb" in cmd and "${fdt_addr_r}" in cmd
    assert "console=ttyS2,1500000" in cmd
    import json
    assert json.loads((root / "etc/appliance/board.json").read_text())["cpu"]["big"] == [4, 5, 6, 7]


def test_templates_overlay_replaces_and_adds(tmp_path):
    ov = tmp_path / "ov"
    (ov / "rootfs/etc").mkdir(parents=True)
    (ov / "rootfs/etc/hostname.j2").write_text("custom-{{ board.name }}\n")
    (ov / "rootfs/etc/extra.conf.j2").write_text("x={{ profile }}\n")
    c = make_config("qemu-arm64", boards_dir=B, templates_overlay=ov)
    root = tmp_path / "root"
    written = render_tree("rootfs", root, template_context(c, {}), c.templates_overlay)
    assert (root / "etc/hostname").read_text() == "custom-qemu-arm64\n"
    assert (root / "etc/extra.conf").read_text() == "x=production\n"
    assert "etc/fstab" in written  # built-ins still there


def test_arm64_boards_share_one_rootfs():
    assert plan_rootfs(cfg()).key() == plan_rootfs(cfg("rk3588", variant="rock-5b")).key()


def test_agent_units_only_with_agent(tmp_path):
    c = cfg()
    without = render_tree("rootfs", tmp_path / "a", template_context(c, {}, agent=False))
    with_ = render_tree("rootfs", tmp_path / "b", template_context(c, {}, agent=True))
    unit = "etc/systemd/system/appliance-runtime.service"
    assert unit not in without and unit in with_
    text = (tmp_path / "b" / unit).read_text()
    assert "ExecStart=/opt/appliance/appliance-agent/appliance-agent runtime serve" in text
    assert "Type=notify" in text and "WatchdogSec=" in text


@pytest.mark.parametrize("log,needle", [
    ("E: Unable to locate package linux-image-riscv\nE: mmdebstrap failed to run", "Unable to locate package linux-image-riscv"),
    ("tar: write error: No space left on device\nE: mmdebstrap failed to run", "disk full"),
    ("E: dpkg was interrupted\nE: mmdebstrap failed to run", "dpkg was interrupted"),
])
def test_mmdebstrap_failures_explained(log, needle):
    from appliance.image.rootfs import explain_failure

    msg = explain_failure(log, "http://deb.debian.org/debian")
    assert needle in msg and "\n" not in msg


def test_newc_archive_is_readable_by_the_kernel_format(tmp_path):
    from appliance.image.verity import newc_archive

    blob = newc_archive([("scripts", 0o40755, b""), ("scripts/x", 0o100755, b"#!/bin/sh\n")], 1767225600)
    assert len(blob) % 512 == 0 and blob.startswith(b"070701")
    # walk it the way the kernel's unpacker does
    off, names = 0, []
    while True:
        h = blob[off:off + 110]
        namesize, filesize = int(h[94:102], 16), int(h[54:62], 16)
        name = blob[off + 110: off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        data = blob[off: off + filesize]
        off = (off + filesize + 3) & ~3
        names.append((name, data))
        if name == "TRAILER!!!":
            break
    assert names[:2] == [("scripts", b""), ("scripts/x", b"#!/bin/sh\n")]


def test_verity_format_on_a_small_image(tmp_path):
    import os
    import subprocess

    from appliance.image.verity import format_root

    img = tmp_path / "root.fs"
    img.write_bytes(os.urandom(100_000))
    v = format_root(img, "t")
    assert v["hash_offset"] == 102400 and img.stat().st_size > v["hash_offset"]
    again = tmp_path / "again.fs"
    again.write_bytes(img.read_bytes()[:100_000])
    assert format_root(again, "t")["roothash"] == v["roothash"]  # reproducible
    r = subprocess.run(["veritysetup", "verify", str(img), str(img), v["roothash"], f"--hash-offset={v['hash_offset']}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = bytearray(img.read_bytes())
    data[5000] ^= 1
    img.write_bytes(bytes(data))
    r = subprocess.run(["veritysetup", "verify", str(img), str(img), v["roothash"], f"--hash-offset={v['hash_offset']}"],
                       capture_output=True, text=True)
    assert r.returncode != 0


def test_initramfs_scripts_render_and_parse(tmp_path):
    """The initramfs scripts are shell inside jinja2 (`${#x}` would open a jinja comment): each
    must render and pass `sh -n`."""
    import subprocess

    written = render_tree("initramfs", tmp_path, {"mapper_name": "vroot"})
    assert {"scripts/local-top/appliance-verity", "scripts/local-bottom/appliance-machine-id"} <= set(written)
    for rel in written:
        r = subprocess.run(["sh", "-n", str(tmp_path / rel)], capture_output=True, text=True)
        assert r.returncode == 0, (rel, r.stderr)
    assert '"${#id}" -eq 32' in (tmp_path / "scripts/local-bottom/appliance-machine-id").read_text()
