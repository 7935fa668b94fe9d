"""A/B boot state transitions and the update installer, run on the host.

The device's partitions are plain files here and its boot partition a directory (this machine
has no spare block devices to give a test); the installer opens them exactly as it opens
/dev/disk/by-partlabel/* on a device. The bundle is made by the image builder's real writer
and signed with a real Ed25519 key.
"""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.image.config import make_config
from appliance.image.signing import public_pem, sign
from appliance.image.update_bundle import write_bundle
from appliance.secure import slots, update

BOARDS = Path(__file__).resolve().parents[2] / "boards"
ROOTHASH_OLD = "11" * 32


# --- boot state (pure) ---

def test_state_round_trip_and_uboot_export_form():
    st = slots.BootState(("b", "a"), {"a": 3, "b": 2})
    assert slots.parse_state(slots.format_state(st)) == st
    # What U-Boot's `env export -t` writes: NUL-terminated, hex numbers from setexpr.
    assert slots.parse_state("BOOT_ORDER=b a\nBOOT_a_LEFT=3\nBOOT_b_LEFT=0\n\0") == \
        slots.BootState(("b", "a"), {"a": 3, "b": 0})


def test_garbled_state_reads_like_the_boot_script_does():
    st = slots.parse_state("\x00\xff garbage")
    assert st.order == ("a", "b") and st.tries("a") == slots.BOOT_TRIES and st.tries("b") == slots.BOOT_TRIES
    assert slots.parse_state("BOOT_ORDER=z q\n").order == ("a", "b")


def test_install_sequence_never_offers_a_half_written_slot():
    st = slots.BootState(("a",), {"a": 2, "b": 0})
    during = slots.begin_install(st, "b")
    assert during.next_slot() == "a" and "b" not in during.order
    after = slots.activate(during, "b")
    assert after.order == ("b", "a") and after.next_slot() == "b" and after.tries("b") == slots.BOOT_TRIES
    # b fails three times: U-Boot spends its tries, then a boots again.
    spent = slots.BootState(after.order, {**after.left, "b": 0})
    assert spent.next_slot() == "a"
    assert slots.mark_good(spent, "a").tries("a") == slots.BOOT_TRIES


def test_booted_slot_from_cmdline():
    assert slots.booted_slot("root=x appliance.slot=b quiet") == "b"
    assert slots.booted_slot("root=x quiet") is None


# --- installer (effects on files) ---

class FakeSigning:
    def __init__(self):
        self.key = Ed25519PrivateKey.generate()

    def sign(self, data: bytes) -> bytes:
        return sign(self.key, data)


@pytest.fixture
def device(tmp_path):
    """A device running 0.1.0 from slot a: partitions as files, boot partition as a directory."""
    key = FakeSigning()
    d = tmp_path / "dev"
    (d / "boot/a").mkdir(parents=True)
    (d / "boot/a/vmlinuz").write_bytes(b"old kernel")
    slots.write_state(d / "boot", slots.BootState(("a",), {"a": 3, "b": 0}))
    for s in "ab":
        (d / f"root-{s}").write_bytes(b"\0" * (4 << 20))
    (d / "pub.pem").write_bytes(public_pem(key.key))
    (d / "manifest.json").write_text(json.dumps({"board": "qemu-arm64", "variant": None, "version": "0.1.0"}))
    (d / "cmdline").write_text(f"root=PARTLABEL=root-a appliance.verity={ROOTHASH_OLD}:4096 appliance.slot=a\n")
    dev = update.Device(pubkey=d / "pub.pem", manifest=d / "manifest.json", cmdline=d / "cmdline", boot=d / "boot",
                        root_devices=(("a", d / "root-a"), ("b", d / "root-b")))
    return dev, key


def make_bundle(tmp_path, key, version="0.2.0", board="qemu-arm64", root=None, roothash="22" * 32):
    cfg = make_config(board, boards_dir=BOARDS, image_version=version,
                      variant="rock-5b" if board == "rk3588" else None)
    src = tmp_path / f"src-{version}-{board}"
    (src / "slot/dtbs").mkdir(parents=True)
    (src / "slot/vmlinuz").write_bytes(b"new kernel " + version.encode())
    (src / "slot/initrd.img").write_bytes(b"new initrd")
    root_img = src / "root.img"
    root_img.write_bytes(root if root is not None else bytes(range(256)) * 4096)
    out = tmp_path / f"{board}-{version}.update"
    write_bundle(out, cfg, {"roothash": roothash, "hash_offset": 4096}, root_img, src / "slot", key.sign)
    return out, root_img


def test_install_writes_inactive_slot_and_switches(tmp_path, device):
    dev, key = device
    bundle, root_img = make_bundle(tmp_path, key)
    lines = []
    assert update.install(bundle, dev, progress=lines.append) == "b"
    data = root_img.read_bytes()
    written = (dev.root_device("b")).read_bytes()
    assert written[:len(data)] == data
    assert dev.root_device("a").read_bytes() == b"\0" * (4 << 20)  # the running slot is untouched
    boot = dev.boot
    assert (boot / "b/vmlinuz").read_bytes() == b"new kernel 0.2.0"
    env = (boot / "b/slot.env").read_text()
    assert "root=PARTLABEL=root-b" in env and "appliance.slot=b" in env and "22" * 32 in env
    assert (boot / "a/vmlinuz").read_bytes() == b"old kernel"
    st = slots.read_state(boot)
    assert st.order == ("b", "a") and st.next_slot() == "b" and st.tries("b") == slots.BOOT_TRIES
    assert any("switched" in m for m in lines)


@pytest.mark.parametrize("case", ["bad-signature", "older", "wrong-board", "tampered-root", "same-build"])
def test_refusals_leave_the_device_as_it_was(tmp_path, device, case):
    dev, key = device
    before = {p: p.read_bytes() for p in dev.boot.rglob("*") if p.is_file()}
    before_b = dev.root_device("b").read_bytes()
    if case == "bad-signature":
        bundle, _ = make_bundle(tmp_path, FakeSigning())
        exc = update.BundleSignatureError
    elif case == "older":
        bundle, _ = make_bundle(tmp_path, key, version="0.0.9")
        exc = update.VersionError
    elif case == "wrong-board":
        bundle, _ = make_bundle(tmp_path, key, board="rk3588")
        exc = update.BoardError
    elif case == "same-build":
        bundle, _ = make_bundle(tmp_path, key, version="0.1.0", roothash=ROOTHASH_OLD)
        assert update.install(bundle, dev, progress=lambda m: None) == ""
        exc = None
    else:
        bundle, _ = make_bundle(tmp_path, key)
        raw = bytearray(bundle.read_bytes())
        raw[-20000] ^= 0xFF  # inside root.img, after the signed header
        bundle.write_bytes(bytes(raw))
        exc = update.IntegrityError
    if exc is not None:
        with pytest.raises(exc) as e:
            update.install(bundle, dev, progress=lambda m: None)
        assert "\n" not in str(e.value)
    st = slots.read_state(dev.boot)
    assert st.next_slot() == "a" and "b" not in st.order  # never offered a slot that is not complete
    if case != "tampered-root":
        after = {p: p.read_bytes() for p in dev.boot.rglob("*") if p.is_file()}
        assert after == before and dev.root_device("b").read_bytes() == before_b


def test_interrupted_install_then_rerun_completes(tmp_path, device):
    """A power cut mid-write is a process that stops: the stream ends early here."""
    dev, key = device
    bundle, root_img = make_bundle(tmp_path, key)
    raw = bundle.read_bytes()
    with pytest.raises(update.UpdateError):
        update.install(io.BytesIO(raw[: len(raw) // 2]), dev, progress=lambda m: None)
    assert slots.read_state(dev.boot).next_slot() == "a"
    assert update.install(bundle, dev, progress=lambda m: None) == "b"
    assert slots.read_state(dev.boot).next_slot() == "b"


def test_mark_good_refills_the_booted_slot(device):
    dev, _ = device
    slots.write_state(dev.boot, slots.BootState(("b", "a"), {"a": 3, "b": 1}))
    dev.cmdline.write_text("appliance.slot=b\n")
    assert update.mark_good(dev) == "b"
    assert slots.read_state(dev.boot).tries("b") == slots.BOOT_TRIES


def test_bundle_header_is_signed_and_first(tmp_path):
    key = FakeSigning()
    bundle, root_img = make_bundle(tmp_path, key)
    with tarfile.open(bundle) as tf:
        names = tf.getnames()
        header = tf.extractfile("update.json").read()
        meta = json.loads(header)
    assert names[:2] == ["update.json", "update.json.sig"] and names[-1] == "root.img"
    assert meta["root"]["sha256"] == hashlib.sha256(root_img.read_bytes()).hexdigest()
    assert meta["version"] == "0.2.0" and meta["board"] == "qemu-arm64"


def test_cli_refusal_is_one_line(tmp_path, device, capsys):
    dev, _ = device
    # The CLI reads the host's /proc/cmdline (no appliance.slot=): a one-line refusal, no traceback.
    rc = update.main(["--boot", str(dev.boot), "install", str(tmp_path / "missing.update")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith("appliance-agent update: error:") and "\n" not in err


# --- systemd-boot (UEFI boards) ---

def _sdboot_device(tmp_path, key):
    d = tmp_path / "sd"
    (d / "boot/a").mkdir(parents=True)
    (d / "boot/loader/entries").mkdir(parents=True)
    (d / "boot/loader/entries/slot-a.conf").write_text("title a\nsort-key appliance\nversion 0.1.0\n"
                                                       "options appliance.slot=a\n")
    for s in "ab":
        (d / f"root-{s}").write_bytes(b"\0" * (4 << 20))
    (d / "pub.pem").write_bytes(public_pem(key.key))
    (d / "manifest.json").write_text(json.dumps({"board": "qemu-amd64", "variant": None, "version": "0.1.0"}))
    (d / "cmdline").write_text(f"appliance.verity={ROOTHASH_OLD}:4096 appliance.slot=a\n")
    return update.Device(pubkey=d / "pub.pem", manifest=d / "manifest.json", cmdline=d / "cmdline", boot=d / "boot",
                         root_devices=(("a", d / "root-a"), ("b", d / "root-b")))


def test_sdboot_install_adds_a_counted_entry_and_bless_removes_the_counter(tmp_path):
    key = FakeSigning()
    dev = _sdboot_device(tmp_path, key)
    bundle, _ = make_bundle(tmp_path, key, board="qemu-amd64")
    assert update.install(bundle, dev, progress=lambda m: None) == "b"
    entries = dev.boot / "loader/entries"
    assert sorted(p.name for p in entries.iterdir()) == ["slot-a.conf", "slot-b+3.conf"]
    text = (entries / "slot-b+3.conf").read_text()
    assert "linux   /b/vmlinuz" in text and "root=PARTLABEL=root-b" in text and "version 0.2.0" in text
    backend = slots.for_boot(dev.boot)
    assert backend.state().next_slot() == "b"
    # systemd-boot spends tries by renaming; with none left the good slot a sorts first again.
    (entries / "slot-b+3.conf").rename(entries / "slot-b+0-3.conf")
    assert backend.state().next_slot() == "a" and backend.state().order == ("a", "b")
    (entries / "slot-b+0-3.conf").rename(entries / "slot-b+2-1.conf")
    dev.cmdline.write_text("appliance.slot=b\n")
    update.mark_good(dev)
    assert sorted(p.name for p in entries.iterdir()) == ["slot-a.conf", "slot-b.conf"]
    assert backend.state().order == ("b", "a")  # the higher version wins among good entries
