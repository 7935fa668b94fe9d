"""Envelope format: chunked AES-256-GCM, per-device RSA-OAEP wrap, key rotation, signatures."""
import hashlib
import os

import pytest

from appliance.secure import envelope as env
from appliance.secure import errors as E


def _manifest(data, name="m", version="1.0.0", boards=("qemu-arm64",), wm=None):
    return env.Manifest(name, version, hashlib.sha256(data).hexdigest(), len(data), tuple(boards), wm)


@pytest.mark.parametrize("size", [0, 1, 4096, 4097, 3 * 4096])
def test_roundtrip_chunk_boundaries(size):
    data = os.urandom(size)
    key = os.urandom(32)
    hraw, ct = env.encrypt(data, key, chunk_size=4096)
    h = env.parse_header(hraw)
    assert len(ct) == h.ciphertext_size()
    assert bytes(env.decrypt(hraw, h, ct, key)) == data


def _chunks(ct, h):
    step = h.chunk_size + env.TAG
    return [ct[i:i + step] for i in range(0, len(ct), step)]


def test_truncation_reordering_and_tampering_detected():
    data, key = os.urandom(4096 * 3 + 10), os.urandom(32)
    hraw, ct = env.encrypt(data, key, chunk_size=4096)
    h = env.parse_header(hraw)
    c = _chunks(ct, h)
    swapped = c[1] + c[0] + c[2] + c[3]
    with pytest.raises(E.IntegrityError, match="chunk 0"):
        env.decrypt(hraw, h, swapped, key)
    flipped = bytearray(ct)
    flipped[5000] ^= 1
    with pytest.raises(E.IntegrityError, match="chunk 1"):
        env.decrypt(hraw, h, bytes(flipped), key)
    # truncation to a whole-chunk boundary: the new "last" chunk was sealed as not-last
    short = env.Header(4096, h.nonce_prefix, 4096 * 3)
    with pytest.raises(E.IntegrityError):
        env.decrypt(short.to_bytes(), short, b"".join(c[:3]), key)
    # same chunks under an edited header (header hash is in the AAD)
    other = env.Header(4096, bytes(8), h.plaintext_size)
    with pytest.raises(E.IntegrityError):
        env.decrypt(other.to_bytes(), other, ct, key)
    with pytest.raises(E.IntegrityError):
        env.decrypt(hraw, h, ct, os.urandom(32))


def test_package_for_one_device_only(device_a, device_b, vendor_key):
    (a, pem_a), (b, pem_b) = device_a, device_b
    data = os.urandom(10000)
    pkg = env.build_package(data, _manifest(data), vendor_key, pem_a)
    p = env.parse_package(pkg)
    env.verify_manifest(p.manifest_raw, p.signature, vendor_key.public_key())
    dk = env.unwrap_data_key(p.keyblock, a)
    assert bytes(env.decrypt(p.header_raw, p.header, p.ciphertext, dk)) == data
    with pytest.raises(E.WrongDeviceError, match="encrypted for device key"):
        env.unwrap_data_key(p.keyblock, b)
    # even if the fingerprint is forged to b's, b's token cannot decrypt a's data key
    forged = env.KeyBlock(p.keyblock.oaep_hash, env.device_key_fingerprint(pem_b), p.keyblock.data_key)
    with pytest.raises(E.IntegrityError):
        env.unwrap_data_key(forged, b)


def test_host_side_never_needs_private_key(device_a, vendor_key):
    # build_package takes only the PEM public key; the PEM carries no private material
    _, pem = device_a
    assert b"PRIVATE" not in pem and pem.startswith(b"-----BEGIN PUBLIC KEY-----")


def test_key_rotation_reencrypts_only_the_data_key(device_a, device_b, vendor_key):
    (a, pem_a), (b, pem_b) = device_a, device_b
    data = os.urandom(9000)
    pkg = env.build_package(data, _manifest(data), vendor_key, pem_a, chunk_size=4096)
    rotated = env.rewrap(pkg, a, pem_b)
    p0, p1 = env.parse_package(pkg), env.parse_package(rotated)
    assert bytes(p0.ciphertext) == bytes(p1.ciphertext) and p0.header_raw == p1.header_raw
    assert p0.manifest_raw == p1.manifest_raw and p0.signature == p1.signature
    assert p0.keyblock.data_key != p1.keyblock.data_key
    dk = env.unwrap_data_key(p1.keyblock, b)
    assert bytes(env.decrypt(p1.header_raw, p1.header, p1.ciphertext, dk)) == data
    with pytest.raises(E.WrongDeviceError):
        env.unwrap_data_key(p1.keyblock, a)


def test_signature_checks(vendor_key, device_a):
    from cryptography.hazmat.primitives.asymmetric import ed25519
    _, pem = device_a
    data = b"model"
    pkg = env.build_package(data, _manifest(data), vendor_key, pem)
    p = env.parse_package(pkg)
    with pytest.raises(E.SignatureError):
        env.verify_manifest(p.manifest_raw, p.signature, ed25519.Ed25519PrivateKey.generate().public_key())
    edited = p.manifest_raw.replace(b'"version":"1.0.0"', b'"version":"9.0.0"')
    env.parse_manifest(edited)  # still well-formed ...
    with pytest.raises(E.SignatureError):  # ... but no longer signed
        env.verify_manifest(edited, p.signature, vendor_key.public_key())


def test_strict_parser_rejects_non_canonical_and_unknown_fields(vendor_key, device_a):
    m = _manifest(b"x").to_bytes()
    assert env.parse_manifest(m).name == "m"
    bad = [m.replace(b",", b", ", 1), m[:-1] + b',"extra":1}', b"[]", b"{}", m.replace(b'"m"', b'"../x"'),
           m.replace(b'"1.0.0"', b'"1.0.0-rc1"'), m.replace(b'"format":1', b'"format":true'),
           b'{"a":1,"a":2}', m + b" ", b"\xff"]
    for raw in bad:
        with pytest.raises(E.FormatError):
            env.parse_manifest(raw)
    _, pem = device_a
    pkg = env.build_package(b"abc", _manifest(b"abc"), vendor_key, pem)
    for cut in (0, 7, 12, 50, len(pkg) - 1):
        with pytest.raises(E.FormatError):
            env.parse_package(pkg[:cut])
    with pytest.raises(E.FormatError, match="padded"):
        env.parse_package(pkg + b"\0")
    with pytest.raises(E.FormatError, match="bad magic"):
        env.parse_package(b"X" + pkg[1:])
    assert env.parse_version("1.10.2") > env.parse_version("1.9.9")
