"""PKCS#11 backend against a real SoftHSM2 token."""
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from appliance.secure import errors as E
from appliance.secure.backend import Pkcs11Backend


def _oaep(h):
    return padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)


def test_keypair_generated_on_token_is_idempotent_and_decrypts(device_a, token_config):
    backend, pem = device_a
    pub = serialization.load_pem_public_key(pem)
    assert pub.key_size == 2048
    # a second keygen returns the same key, not a new one
    with Pkcs11Backend(token_config("dev-a")) as again:
        assert again.ensure_device_key() == pem
    secret = b"k" * 32
    ct = pub.encrypt(secret, _oaep(hashes.SHA1))
    assert backend.decrypt_oaep(ct, "SHA-1") == secret


def test_private_key_cannot_be_read(device_a):
    backend, _ = device_a
    for attr in ("PRIVATE_EXPONENT", "PRIME_1", "VALUE"):
        with pytest.raises(E.TokenError, match="refused"):
            backend.private_key_value(attr)
    from pkcs11 import Attribute, ObjectClass
    priv = backend._find(ObjectClass.PRIVATE_KEY, backend.config.key_label)
    assert priv[Attribute.SENSITIVE] is True
    assert priv[Attribute.EXTRACTABLE] is False
    assert priv[Attribute.NEVER_EXTRACTABLE] is True
    assert priv[Attribute.ALWAYS_SENSITIVE] is True


def test_sha256_oaep_refused_by_softhsm_with_clear_error(device_a):
    # SoftHSM 2.6.1 only does OAEP with SHA-1; the error must say what to do instead.
    backend, pem = device_a
    ct = serialization.load_pem_public_key(pem).encrypt(b"x" * 32, _oaep(hashes.SHA256))
    with pytest.raises(E.TokenError, match="--oaep-hash SHA-1"):
        backend.decrypt_oaep(ct, "SHA-256")


def test_other_device_cannot_decrypt(device_a, device_b):
    (a, pem_a), (b, pem_b) = device_a, device_b
    assert pem_a != pem_b
    ct = serialization.load_pem_public_key(pem_a).encrypt(b"s" * 32, _oaep(hashes.SHA1))
    with pytest.raises(E.IntegrityError):
        b.decrypt_oaep(ct, "SHA-1")


def test_mac_key_on_token_is_stable_and_secret(device_a):
    backend, _ = device_a
    m1 = backend.mac(b"hello")
    assert backend.has_mac_key()
    assert backend.mac(b"hello") == m1 and backend.mac(b"hellp") != m1 and len(m1) == 32
    from pkcs11 import Attribute, ObjectClass
    from pkcs11 import exceptions as px
    key = backend._find(ObjectClass.SECRET_KEY, backend.config.mac_label)
    with pytest.raises(px.AttributeSensitive):
        key[Attribute.VALUE]


def test_missing_token_and_bad_pin_and_missing_module(token_config, tmp_path):
    with pytest.raises(E.TokenMissingError, match="no PKCS#11 token labelled 'absent'"):
        Pkcs11Backend(token_config("absent")).ensure_device_key()
    cfg = token_config("dev-c")
    bad = type(cfg)(module=cfg.module, token_label="dev-c", pin="9999")
    with pytest.raises(E.TokenLockedError, match="rejected the PIN"):
        Pkcs11Backend(bad).public_key_pem()
    nofile = type(cfg)(module=cfg.module, token_label="dev-c", pin_file=str(tmp_path / "nope"))
    with pytest.raises(E.TokenLockedError, match="cannot read PIN file"):
        Pkcs11Backend(nofile).public_key_pem()
    gone = type(cfg)(module=str(tmp_path / "libnothing.so"), token_label="dev-c", pin="1234")
    with pytest.raises(E.TokenMissingError, match="not found"):
        Pkcs11Backend(gone).public_key_pem()
