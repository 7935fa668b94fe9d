"""The build signing key: made once with 0600, reused, refused when unsafe or wrong."""
import os
import stat

import pytest

from appliance.image.errors import BuildError
from appliance.image.signing import default_key_path, fingerprint, load_key, load_or_create_key, public_pem, sign, verify


@pytest.fixture(autouse=True)
def config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))


def test_created_once_with_0600_and_reused():
    k1, path, created = load_or_create_key(None)
    assert created and path == default_key_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    k2, _, created2 = load_or_create_key(None)
    assert not created2 and fingerprint(k1) == fingerprint(k2)
    assert not list(path.parent.glob(".*partial"))


def test_sign_and_verify():
    key, _, _ = load_or_create_key(None)
    sig = sign(key, b'{"a": 1}')
    assert verify(public_pem(key), b'{"a": 1}', sig)
    assert not verify(public_pem(key), b'{"a": 2}', sig)
    other, _, _ = load_or_create_key(None)
    assert verify(public_pem(other), b'{"a": 1}', sig)  # same default key
    assert not verify(public_pem(key), b'{"a": 1}', b"not base64!")


def test_world_readable_key_is_refused(tmp_path):
    _, path, _ = load_or_create_key(None)
    os.chmod(path, 0o644)
    with pytest.raises(BuildError, match=r"mode 0644 lets others read it; run chmod 600"):
        load_key(path)


def test_explicit_key_must_exist_and_be_ed25519(tmp_path):
    with pytest.raises(BuildError, match="cannot read"):
        load_or_create_key(tmp_path / "missing.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    os.chmod(bad, 0o600)
    with pytest.raises(BuildError, match="not an unencrypted PEM private key"):
        load_key(bad)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ecpem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    wrong = tmp_path / "ec.pem"
    wrong.write_bytes(ecpem)
    os.chmod(wrong, 0o600)
    with pytest.raises(BuildError, match="is not an Ed25519 key"):
        load_key(wrong)
