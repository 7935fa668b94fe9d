"""e2e: build qemu-arm64, boot it through U-Boot + boot.scr (slot a) in QEMU, check it from inside.

Costs: cold ~15 min (mmdebstrap under qemu-user), warm build ~1 min, boot ~60-100 s (TCG).
"""
import json
import subprocess
import time

import pytest

from appliance.image.boot import READY_MARKER, start
from appliance.image.inspect import partitions, read_vfat_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]


def test_artefacts(qemu_arm64_debug, tmp_path):
    cfg, res = qemu_arm64_debug
    m = json.loads(res.manifest.read_text())
    assert m["board"] == "qemu-arm64" and m["profile"] == "debug"
    assert (res.image.parent / "manifest.json").read_text() == res.manifest.read_text()
    names = {p["name"]: p for p in partitions(res.image)}
    assert list(names) == ["boot", "root-a", "root-b", "data"]
    assert {p["label"] for p in m["partitions"]} == set(names)
    assert any(p["name"] == "systemd" and p["version"] for p in m["packages"])
    assert m["image"]["mapped_bytes"] < m["image"]["bytes"]
    # the bmap is real: bmaptool copies the image with it and checks every mapped range
    target = tmp_path / "copy.img"
    r = subprocess.run(["bmaptool", "copy", "--bmap", str(res.bmap), str(res.image), str(target)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert target.stat().st_size == res.image.stat().st_size
    from appliance.image.signing import verify

    sig = res.manifest.with_name(res.manifest.name + ".sig").read_bytes()
    pub = res.image.with_name("qemu-arm64.build-key.pub.pem").read_bytes()
    assert verify(pub, res.manifest.read_bytes(), sig)
    assert not verify(pub, res.manifest.read_bytes().replace(b'"debug"', b'"production"'), sig)
    sbom = json.loads(res.sbom.read_text())
    assert sbom["spdxVersion"] == "SPDX-2.3" and len(sbom["packages"]) == len(m["packages"])
    # no half-written leftovers
    assert not list(res.image.parent.glob(".*partial")) and not list(res.image.parent.glob(".work-*"))


def test_boots_with_readonly_erofs_root_and_writable_data(qemu_arm64_debug, tmp_path):
    cfg, res = qemu_arm64_debug
    # A card bigger than the image: the data partition must grow into the rest on first boot.
    card = tmp_path / "card.img"
    subprocess.run(["cp", "--sparse=always", str(res.image), str(card)], check=True)
    with open(card, "r+b") as f:
        f.truncate(res.image.stat().st_size + (512 << 20))
    t0 = time.monotonic()
    with start(card, board=cfg.board, log_path=tmp_path / "console.log") as vm:
        vm.expect(r"U-Boot \d{4}", 60)                        # the real firmware ran
        vm.expect(READY_MARKER + r" board=qemu-arm64", 600)  # our own unit printed the marker
        ready_s = time.monotonic() - t0
        vm.send("\n")                                        # the prompt may have come before the marker
        vm.expect(r"root@qemu-arm64:[^\n]*# ", 120)           # debug profile: root shell on the console
        rc, out = vm.run("findmnt -no SOURCE,FSTYPE,OPTIONS /")
        src, fstype, opts = out.split()
        assert rc == 0 and fstype == "erofs" and "ro" in opts.split(","), out
        assert src == "/dev/mapper/vroot", f"root is not the verity device: {out}"
        rc, out = vm.run("veritysetup status vroot")
        assert rc == 0 and "status:      verified" in out, out
        assert res.manifest_data["root"]["verity"]["roothash"] in vm.run("cat /proc/cmdline")[1]
        rc, out = vm.run("findmnt -no FSTYPE,OPTIONS,SOURCE /data")
        fstype, opts, _src = out.split()
        assert rc == 0 and fstype == "ext4" and "rw" in opts.split(","), out
        rc, _ = vm.run("touch /etc/should-fail")
        assert rc != 0
        rc, out = vm.run("echo hello > /data/probe && cat /data/probe")
        assert rc == 0 and "hello" in out
        rc, out = vm.run("systemctl is-system-running --wait", timeout=180)
        failed = vm.run("systemctl --failed --no-legend")[1]
        assert out.strip() == "running", f"state {out.strip()}; failed units: {failed}"
        rc, out = vm.run("cat /etc/appliance/board.json")
        assert json.loads(out)["name"] == "qemu-arm64"
        rc, out = vm.run("df --output=size -B1M /data | tail -1")
        assert rc == 0 and int(out.strip()) > cfg.board.disk.data_mib + 400, f"/data not grown: {out}"
        rc, out = vm.run("ls /data/ssh/etc/ssh/")
        assert "ssh_host_ed25519_key" in out   # host keys made on the device, on first boot
    print(f"boot to {READY_MARKER}: {ready_s:.1f} s")


def test_warm_rebuild_with_changed_template_reuses_rootfs(qemu_arm64_debug, tmp_path):
    from appliance.image import cache
    from appliance.image.build import build
    from appliance.image.config import make_config
    from appliance.image.rootfs import plan_rootfs

    cfg, first = qemu_arm64_debug
    entry = cache.lookup("rootfs", plan_rootfs(cfg).key())
    assert entry is not None
    before = (entry / "rootfs.tar").stat()
    ov = tmp_path / "overlay/boot-u-boot"
    ov.mkdir(parents=True)
    from appliance.image.templates_render import TEMPLATES
    text = (TEMPLATES / "boot-u-boot/boot.cmd.j2").read_text()
    (ov / "boot.cmd.j2").write_text("echo overlay-was-here\n" + text)
    cfg2 = make_config("qemu-arm64", profile="debug", out_dir=tmp_path / "out",
                       templates_overlay=tmp_path / "overlay")
    res = build(cfg2)
    assert res.rootfs_cache_hit
    after = (entry / "rootfs.tar").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not (res.image.parent / "mmdebstrap.log").exists()
    assert b"echo overlay-was-here" in read_vfat_file(res.image, "boot", "/boot.scr")
    assert b"overlay-was-here" not in read_vfat_file(first.image, "boot", "/boot.scr")
    print(f"warm rebuild stages: {res.timings}")
