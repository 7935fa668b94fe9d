"""The build key: an Ed25519 key that signs every image manifest.

Created on first use in the user's config dir (0600), or given with --signing-key. The
signature is detached (NAME.manifest.json.sig, base64) so the manifest stays plain JSON; the
public half is published next to it and its fingerprint is recorded inside the manifest.
"""
from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import BuildError


def default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "appliance" / "build-ed25519.pem"


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise BuildError(f"signing key {path}: cannot read: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BuildError(f"signing key {path}: mode {stat.S_IMODE(mode):04o} lets others read it; run chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise BuildError(f"signing key {path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BuildError(f"signing key {path}: is not an Ed25519 key")
    return key


def load_or_create_key(path: Path | None) -> tuple[Ed25519PrivateKey, Path, bool]:
    """(key, path, created). An explicit path must exist; the default one is made on first use."""
    if path is not None:
        return load_key(path), path, False
    path = default_key_path()
    if path.exists():
        return load_key(path), path, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.link(tmp, path)  # never replaces a key another build created meanwhile
    tmp.unlink()
    return key, path, True


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return base64.b64encode(key.sign(data)) + b"\n"


def verify(public_key_pem: bytes, data: bytes, signature_b64: bytes) -> bool:
    pub = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(pub, Ed25519PublicKey):
        return False
    try:
        pub.verify(base64.b64decode(signature_b64.strip(), validate=True), data)
        return True
    except (InvalidSignature, ValueError):
        return False
