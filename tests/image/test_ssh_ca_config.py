"""--ssh-ca is validated at the edge: one public key line, never a private key."""
import subprocess

import pytest

from appliance.image.config import read_ssh_ca
from appliance.image.errors import BuildError


def test_reads_a_real_ca_public_key(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "factory-ca", "-f", str(tmp_path / "ca")],
                   check=True)
    line = read_ssh_ca(tmp_path / "ca.pub")
    assert line.startswith("ssh-ed25519 ") and line.endswith("factory-ca")


@pytest.mark.parametrize("text, needle", [
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "private key"),
    ("", "not one OpenSSH public key line"),
    ("ssh-ed25519 AAAA!!notbase64 x\n", "base64"),
    ("ssh-ed25519 AAAAC3Nza x\nssh-ed25519 AAAAC3Nza y\n", "not one"),
    ("hello world\n", "not one"),
])
def test_bad_ca_files_get_one_line_errors(tmp_path, text, needle):
    p = tmp_path / "ca.pub"
    p.write_text(text)
    with pytest.raises(BuildError, match=needle) as e:
        read_ssh_ca(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(BuildError, match="cannot read"):
        read_ssh_ca(tmp_path / "nope.pub")


def test_vendor_key_public_ed25519_only(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

    from appliance.image.config import read_vendor_key

    k = Ed25519PrivateKey.generate()
    pub = tmp_path / "vendor.pub.pem"
    pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    assert read_vendor_key(pub).startswith("-----BEGIN PUBLIC KEY-----")
    priv = tmp_path / "vendor.pem"
    priv.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    rsa = tmp_path / "rsa.pub.pem"
    rsa.write_bytes(generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    for p, needle in ((priv, "private key"), (rsa, "not an Ed25519"), (junk, "not a PEM"), (tmp_path / "no", "cannot")):
        with pytest.raises(BuildError, match=needle):
            read_vendor_key(p)
