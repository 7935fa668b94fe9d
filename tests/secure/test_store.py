"""Device store against a real SoftHSM2 token: install/list/load and every refusal."""
import hashlib
import os
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from appliance.secure import envelope as env
from appliance.secure import errors as E
from appliance.secure.backend import Pkcs11Backend
from appliance.secure.source import SecureModelSource
from appliance.secure.store import DeviceStore

BOARD = "qemu-arm64"


def pkg_for(pem, vendor, data, version="1.0.0", name="det", boards=(BOARD,), wm=None, chunk=4096):
    m = env.Manifest(name, version, hashlib.sha256(data).hexdigest(), len(data), tuple(boards), wm)
    return env.build_package(data, m, vendor, pem, chunk_size=chunk)


@pytest.fixture
def store(tmp_path, token_config, device_a, vendor_key):
    # own MAC key label per test: each test is a fresh device data partition
    backend = Pkcs11Backend(token_config("dev-a", mac_label=f"mac-{uuid.uuid4().hex}"))
    yield DeviceStore(tmp_path / "store", backend, vendor_key.public_key(), BOARD)
    backend.close()


def test_install_list_load_and_source(store, device_a, vendor_key):
    _, pem = device_a
    data = os.urandom(20000)
    m = store.install(pkg_for(pem, vendor_key, data, wm="0011223344556677"))
    assert (m.name, m.version) == ("det", "1.0.0")
    [info] = store.list()
    assert (info.name, info.version, info.highest_accepted, info.status) == ("det", "1.0.0", "1.0.0", "ok")
    assert info.watermark_id == "0011223344556677"
    src = SecureModelSource(store)
    assert src.names() == ["det"]
    model = src.load("det")
    assert (model.name, model.version, model.content) == ("det", "1.0.0", data)
    assert isinstance(model.content, bytes)
    fd, manifest = store.load_memfd("det")
    try:
        assert manifest.version == "1.0.0"
        assert os.read(fd, len(data) + 1) == data
        with open(f"/proc/self/fd/{fd}", "rb") as f:  # the path TFLite mmaps
            assert f.read() == data
        with pytest.raises(PermissionError):  # sealed against writes
            os.write(fd, b"x")
    finally:
        os.close(fd)
    with pytest.raises(E.StoreError, match="not installed"):
        src.load("other")


def test_plaintext_never_written_to_disk(store, device_a, vendor_key):
    _, pem = device_a
    data = b"PLAINTEXT-MARKER-" * 500
    store.install(pkg_for(pem, vendor_key, data))
    store.load("det")
    for root, _, files in os.walk(store.dir):
        for f in files:
            assert b"PLAINTEXT-MARKER" not in open(os.path.join(root, f), "rb").read()


def test_rollback_refused_on_install_and_on_swapped_file(store, device_a, vendor_key):
    _, pem = device_a
    old = pkg_for(pem, vendor_key, b"v1" * 100, "1.9.0")
    store.install(old)
    old_sealed = (store.models / "det.pkg").read_bytes()
    store.install(pkg_for(pem, vendor_key, b"v2" * 100, "1.10.0"))
    with pytest.raises(E.RollbackError, match="version 1.9.0 is older than version 1.10.0"):
        store.install(old)
    store.install(pkg_for(pem, vendor_key, b"v2" * 100, "1.10.0"))  # same version again: allowed
    # an attacker puts the old (validly sealed) file back on disk: load refuses it too
    (store.models / "det.pkg").write_bytes(old_sealed)
    with pytest.raises(E.RollbackError):
        store.load("det")


def test_wrong_board_bad_signature_and_foreign_device(store, device_a, device_b, vendor_key):
    _, pem = device_a
    with pytest.raises(E.BoardMismatchError, match="this device is qemu-arm64"):
        store.install(pkg_for(pem, vendor_key, b"x", boards=("rk3588",)))
    other_vendor = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(E.SignatureError):
        store.install(pkg_for(pem, other_vendor, b"x"))
    _, pem_b = device_b
    with pytest.raises(E.WrongDeviceError):
        store.install(pkg_for(pem_b, vendor_key, b"x"))
    assert store.names() == []


def test_gcm_failure_on_install_and_on_disk(store, device_a, vendor_key):
    _, pem = device_a
    pkg = bytearray(pkg_for(pem, vendor_key, os.urandom(10000)))
    pkg[-100] ^= 0x40
    with pytest.raises(E.IntegrityError, match="failed AES-GCM authentication"):
        store.install(bytes(pkg))
    pkg[-100] ^= 0x40
    store.install(bytes(pkg))
    path = store.models / "det.pkg"
    raw = bytearray(path.read_bytes())
    raw[-5000] ^= 1
    path.write_bytes(raw)
    with pytest.raises(E.IntegrityError, match="chunk"):
        store.load("det")
    with pytest.raises(E.IntegrityError, match="chunk"):
        store.load_memfd("det")


def test_counter_file_forged_or_deleted(store, device_a, vendor_key):
    _, pem = device_a
    store.install(pkg_for(pem, vendor_key, b"a", "2.0.0"))
    cpath = store.dir / "counter"
    body, tag = cpath.read_bytes().rsplit(b"\n", 1)
    cpath.write_bytes(body.replace(b"2.0.0", b"0.0.0") + b"\n" + tag)
    with pytest.raises(E.CounterError, match="failed authentication"):
        store.install(pkg_for(pem, vendor_key, b"a", "1.0.0"))
    cpath.unlink()
    with pytest.raises(E.CounterError, match="missing"):
        store.install(pkg_for(pem, vendor_key, b"a", "1.0.0"))


def test_missing_and_locked_token_through_store(tmp_path, token_config, vendor_key, device_a):
    _, pem = device_a
    pkg = pkg_for(pem, vendor_key, b"a")
    gone = DeviceStore(tmp_path, Pkcs11Backend(token_config("no-such-token")), vendor_key.public_key(), BOARD)
    with pytest.raises(E.TokenMissingError):
        gone.install(pkg)
    cfg = token_config("dev-c")
    locked = DeviceStore(tmp_path, Pkcs11Backend(type(cfg)(module=cfg.module, token_label="dev-c", pin="0000")),
                         vendor_key.public_key(), BOARD)
    with pytest.raises(E.TokenLockedError):
        locked.install(pkg)


def test_files_not_installed_by_this_store_are_refused(store, device_a, vendor_key):
    """A package made for this device's (public) key and dropped into the store, or a sealed
    file with a forged seal, does not load: only what install verified does."""
    _, pem = device_a
    store.install(pkg_for(pem, vendor_key, b"real" * 100))
    path = store.models / "det.pkg"
    sealed = path.read_bytes()
    path.write_bytes(pkg_for(pem, vendor_key, b"evil" * 100))
    with pytest.raises(E.FormatError, match="no install seal"):
        store.load("det")
    forged = bytearray(sealed)
    forged[-20] ^= 1
    path.write_bytes(forged)
    with pytest.raises(E.IntegrityError, match="install seal"):
        store.load("det")
    path.write_bytes(sealed)
    assert store.load("det").content == b"real" * 100
    assert store.load("det", rehash=True).content == b"real" * 100


def test_source_from_env_takes_module_from_board_file(tmp_path, softhsm, device_a, vendor_key):
    """Like the agent: the PKCS#11 module comes from board.json's secure.pkcs11_module unless
    APPLIANCE_PKCS11_MODULE is set; the board name from the same file."""
    import json

    from cryptography.hazmat.primitives import serialization
    (tmp_path / "vendor.pub").write_bytes(vendor_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "pin").write_text("1234\n")
    board = tmp_path / "board.json"
    board.write_text(json.dumps({"name": BOARD, "secure": {"pkcs11_module": str(tmp_path / "libckteec.so.0")}}))
    env = {"APPLIANCE_BOARD_FILE": str(board), "APPLIANCE_VENDOR_KEY": str(tmp_path / "vendor.pub"),
           "APPLIANCE_TOKEN_LABEL": "dev-a", "APPLIANCE_PIN_FILE": str(tmp_path / "pin"),
           "APPLIANCE_STORE_DIR": str(tmp_path / "store")}
    src = SecureModelSource.from_env(env)
    assert src.store.backend.config.module.endswith("libckteec.so.0") and src.store.board == BOARD
    with pytest.raises(E.TokenMissingError, match="libckteec.so.0 not found"):
        src.store.backend.public_key_pem()
    env["APPLIANCE_PKCS11_MODULE"] = "/usr/lib/softhsm/libsofthsm2.so"
    src = SecureModelSource.from_env(env)
    assert src.store.backend.public_key_pem() == device_a[1]
    assert src.names() == []


class _CountingBackend:
    """The real token backend; counts RSA-OAEP operations (what the sealed data key saves) and
    HMACs (token operations per load)."""

    def __init__(self, backend):
        self.b, self.oaep, self.macs = backend, 0, 0

    def decrypt_oaep(self, *a):
        self.oaep += 1
        return self.b.decrypt_oaep(*a)

    def mac(self, *a):
        self.macs += 1
        return self.b.mac(*a)

    def __getattr__(self, name):
        return getattr(self.b, name)


def test_load_uses_the_sealed_data_key_not_rsa_and_older_trailers_still_load(
        store, device_a, vendor_key):
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

    from appliance.secure.store import SEAL_MAGIC, SEAL_MAGIC2, SEAL_MAGIC3, _seal_input

    _, pem = device_a
    data = os.urandom(30000)
    store.install(pkg_for(pem, vendor_key, data))
    path = store.models / "det.pkg"
    raw = path.read_bytes()
    assert raw.endswith(SEAL_MAGIC3)
    counting = _CountingBackend(store.backend)
    store.backend = counting
    store.counter.backend = counting
    assert store.load("det").content == data
    fd, _ = store.load_memfd("det")
    os.close(fd)
    assert counting.oaep == 0  # no RSA private-key operation on load
    before = counting.macs
    assert store.load("det").content == data
    # One token HMAC gives seal and KEK; the unchanged counter was authenticated before.
    assert counting.macs - before == 1

    # A package installed by the second store format (seal and KEK from two HMACs) still loads.
    body = raw[:-80]
    p = env.parse_package(body)
    key = aes_key_unwrap(store._seal_and_kek(p)[1], raw[-80:-40])
    v2 = body + aes_key_wrap(store._kek(p), key) + counting.mac(_seal_input(p), "seal") + SEAL_MAGIC2
    path.write_bytes(v2)
    assert store.load("det").content == data
    assert counting.oaep == 0

    # A package installed by the first store format (seal only) still loads, through RSA-OAEP.
    seal = counting.mac(_seal_input(p), "seal")
    path.write_bytes(body + seal + SEAL_MAGIC)
    assert store.load("det").content == data
    assert counting.oaep == 1

    # A v2 seal under the v3 magic (or the reverse) does not verify: the derivations differ.
    path.write_bytes(v2[:-8] + SEAL_MAGIC3)
    with pytest.raises(E.IntegrityError, match="install seal does not verify"):
        store.load("det")

    # The wrapped key is not covered by the seal but by AES key wrap's own integrity check.
    bad = bytearray(raw)
    bad[-60] ^= 1
    path.write_bytes(bytes(bad))
    with pytest.raises(E.IntegrityError, match="sealed data key does not unwrap"):
        store.load("det")
    with pytest.raises(E.IntegrityError, match="sealed data key does not unwrap"):
        store.load_memfd("det")


def test_counter_is_authenticated_again_when_its_file_changes(store, device_a, vendor_key):
    _, pem = device_a
    store.install(pkg_for(pem, vendor_key, os.urandom(1000)))
    counting = _CountingBackend(store.backend)
    store.counter.backend = counting
    assert store.counter.get("det") is not None
    n = counting.macs
    store.counter.get("det")
    assert counting.macs == n  # same bytes: no second token operation
    raw = store.counter.path.read_bytes()
    store.counter.path.write_bytes(raw.replace(b'"1.', b'"0.', 1))
    with pytest.raises(E.CounterError, match="failed authentication"):
        store.counter.get("det")
    store.counter.path.write_bytes(raw)
    assert store.counter.get("det") is not None


def test_backend_caches_found_keys_but_not_missing_ones(token_config, device_a):
    label = f"mac-{uuid.uuid4().hex}"
    a = Pkcs11Backend(token_config("dev-a", mac_label=label))
    b = Pkcs11Backend(token_config("dev-a", mac_label=label))
    try:
        assert a.has_mac_key() is False
        tag = b.mac(b"x")  # created by another session after `a` looked
        assert a.has_mac_key() is True and a.mac(b"x") == tag
        a.close()  # handles die with the session
        assert a.mac(b"x") == tag
    finally:
        a.close()
        b.close()
