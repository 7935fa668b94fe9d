"""Envelope encryption and the package container (pure functions, no token access).

Package file layout (all integers big-endian)::

    b"APLMPKG1"                      magic, 8 bytes
    u32 len | manifest               canonical JSON, signed by the vendor (Ed25519)
    u16 len | signature              64 bytes, over b"appliance-manifest-v1\\0" + manifest
    u32 len | header                 canonical JSON: cipher, chunk size, nonce prefix, sizes
    u32 len | keyblock               canonical JSON: data key RSA-OAEP-encrypted to a device key
    chunks                           AES-256-GCM, each chunk_size + 16 bytes (last one shorter)

Each chunk i is sealed with nonce = prefix(8) || u32(i) and
AAD = sha256(header) || u32(i) || u8(last), so truncation, reordering, splicing chunks
from another package and header edits all fail authentication; the AAD is never empty
(SoftHSM mishandles empty AAD and we keep the same rule everywhere). The keyblock is NOT in
the AAD: rotating the device key re-encrypts only the 32-byte data key (`rewrap`).

The parser is strict: exact key sets, canonical JSON only, bounded lengths, no trailing
bytes; every refusal is a `FormatError` with a one-line reason.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import struct

from .errors import FormatError, IntegrityError, SignatureError, WrongDeviceError

MAGIC = b"APLMPKG1"
SIG_DOMAIN = b"appliance-manifest-v1\0"
# Chunk size: a model up to 16 MiB is one GCM message, decrypted straight into one bytes
# object (the fastest path measured); bigger models are chunked and still streamable.
DEFAULT_CHUNK = 16 << 20
MAX_MANIFEST = 64 * 1024
MAX_HEADER = 4096
MAX_KEYBLOCK = 8192
MAX_CHUNK = 16 << 20
MIN_CHUNK = 4096
TAG = 16
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,3}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
WATERMARK_RE = re.compile(r"^[0-9a-f]{16}$")
OAEP_HASHES = ("SHA-1", "SHA-256", "SHA-384", "SHA-512")


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _no_dupes(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise FormatError("duplicate key in JSON object")
    return dict(pairs)


def _parse_canonical(raw: bytes, what: str, keys: set[str]) -> dict:
    try:
        text = bytes(raw).decode("ascii")
        obj = json.loads(text, object_pairs_hook=_no_dupes,
                         parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{what}: not valid ASCII JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: expected a JSON object")
    if set(obj) != keys:
        missing, extra = sorted(keys - set(obj)), sorted(set(obj) - keys)
        raise FormatError(f"{what}: fields missing {missing} unexpected {extra}")
    try:
        again = canonical_json(obj)
    except (ValueError, RecursionError):  # e.g. 1e400 parses as inf, which JSON cannot carry
        raise FormatError(f"{what}: contains a number JSON cannot represent") from None
    if again != bytes(raw):
        raise FormatError(f"{what}: not in canonical form (sorted keys, no spaces)")
    return obj


def _int_field(obj, key, what, lo, hi) -> int:
    v = obj[key]
    if type(v) is not int or not lo <= v <= hi:
        raise FormatError(f"{what}: field {key!r} must be an integer in [{lo}, {hi}]")
    return v


def _str_field(obj, key, what, pattern: re.Pattern | None = None) -> str:
    v = obj[key]
    if not isinstance(v, str) or (pattern is not None and not pattern.match(v)):
        raise FormatError(f"{what}: field {key!r} is malformed")
    return v


def parse_version(version: str) -> tuple[int, ...]:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise FormatError(f"version {version!r} must be 1 to 4 dot-separated integers, e.g. 1.2.0")
    return tuple(int(p) for p in version.split("."))


# --- manifest ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    sha256: str
    size: int
    boards: tuple[str, ...]
    watermark_id: str | None = None  # 16 hex digits (64-bit device id) or None

    def to_bytes(self) -> bytes:
        return canonical_json({"format": 1, "name": self.name, "version": self.version,
                               "sha256": self.sha256, "size": self.size,
                               "boards": list(self.boards), "watermark_id": self.watermark_id})

    def version_key(self) -> tuple[int, ...]:
        return parse_version(self.version)


MANIFEST_KEYS = {"format", "name", "version", "sha256", "size", "boards", "watermark_id"}


def parse_manifest(raw: bytes) -> Manifest:
    what = "manifest"
    obj = _parse_canonical(raw, what, MANIFEST_KEYS)
    if obj["format"] != 1 or type(obj["format"]) is not int:
        raise FormatError(f"{what}: unsupported format {obj['format']!r} (expected 1)")
    name = _str_field(obj, "name", what, NAME_RE)
    version = _str_field(obj, "version", what, VERSION_RE)
    sha = _str_field(obj, "sha256", what, HEX64_RE)
    size = _int_field(obj, "size", what, 0, 1 << 40)
    boards = obj["boards"]
    if (not isinstance(boards, list) or not boards or len(boards) > 64
            or not all(isinstance(b, str) and NAME_RE.match(b) for b in boards)):
        raise FormatError(f"{what}: field 'boards' must be a non-empty list of board names")
    wm = obj["watermark_id"]
    if wm is not None and not (isinstance(wm, str) and WATERMARK_RE.match(wm)):
        raise FormatError(f"{what}: field 'watermark_id' must be 16 lowercase hex digits or null")
    return Manifest(name, version, sha, size, tuple(boards), wm)


def sign_manifest(manifest: Manifest, signing_key) -> bytes:
    return signing_key.sign(SIG_DOMAIN + manifest.to_bytes())


def verify_manifest(raw: bytes, signature: bytes, vendor_public_key) -> None:
    from cryptography.exceptions import InvalidSignature

    try:
        vendor_public_key.verify(signature, SIG_DOMAIN + bytes(raw))
    except InvalidSignature:
        raise SignatureError("manifest signature does not verify with the vendor key "
                             "(package altered or signed by another vendor key)") from None


# --- header and keyblock ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Header:
    chunk_size: int
    nonce_prefix: bytes
    plaintext_size: int

    @property
    def chunks(self) -> int:
        return max(1, -(-self.plaintext_size // self.chunk_size))

    def ciphertext_size(self) -> int:
        return self.plaintext_size + TAG * self.chunks

    def to_bytes(self) -> bytes:
        return canonical_json({"format": 1, "cipher": "AES-256-GCM", "chunk_size": self.chunk_size,
                               "nonce_prefix": self.nonce_prefix.hex(),
                               "plaintext_size": self.plaintext_size, "chunks": self.chunks})


HEADER_KEYS = {"format", "cipher", "chunk_size", "nonce_prefix", "plaintext_size", "chunks"}


def parse_header(raw: bytes) -> Header:
    what = "envelope header"
    obj = _parse_canonical(raw, what, HEADER_KEYS)
    if type(obj["format"]) is not int or obj["format"] != 1:
        raise FormatError(f"{what}: unsupported format {obj['format']!r}")
    if obj["cipher"] != "AES-256-GCM":
        raise FormatError(f"{what}: unsupported cipher {obj['cipher']!r}")
    chunk = _int_field(obj, "chunk_size", what, MIN_CHUNK, MAX_CHUNK)
    prefix = _str_field(obj, "nonce_prefix", what, re.compile(r"^[0-9a-f]{16}$"))
    size = _int_field(obj, "plaintext_size", what, 0, 1 << 40)
    h = Header(chunk, bytes.fromhex(prefix), size)
    if _int_field(obj, "chunks", what, 1, 1 << 32) != h.chunks:
        raise FormatError(f"{what}: chunk count does not match plaintext_size/chunk_size")
    if h.chunks >= 1 << 32:
        raise FormatError(f"{what}: too many chunks")
    return h


@dataclasses.dataclass(frozen=True)
class KeyBlock:
    oaep_hash: str
    device_key: str  # sha256 hex of the device public key (DER SubjectPublicKeyInfo)
    data_key: bytes  # RSA-OAEP ciphertext

    def to_bytes(self) -> bytes:
        return canonical_json({"wrap": "RSA-OAEP", "hash": self.oaep_hash, "device_key": self.device_key,
                               "data_key": base64.b64encode(self.data_key).decode()})


KEYBLOCK_KEYS = {"wrap", "hash", "device_key", "data_key"}


def parse_keyblock(raw: bytes) -> KeyBlock:
    what = "key block"
    obj = _parse_canonical(raw, what, KEYBLOCK_KEYS)
    if obj["wrap"] != "RSA-OAEP":
        raise FormatError(f"{what}: unsupported wrap {obj['wrap']!r}")
    if obj["hash"] not in OAEP_HASHES:
        raise FormatError(f"{what}: unsupported OAEP hash {obj['hash']!r}")
    fp = _str_field(obj, "device_key", what, HEX64_RE)
    b64 = _str_field(obj, "data_key", what, re.compile(r"^[A-Za-z0-9+/]{1,1400}={0,2}$"))
    try:
        ek = base64.b64decode(b64, validate=True)
    except ValueError:
        raise FormatError(f"{what}: field 'data_key' is not base64") from None
    if not 128 <= len(ek) <= 1024 or base64.b64encode(ek).decode() != b64:
        raise FormatError(f"{what}: field 'data_key' has a bad length")
    return KeyBlock(obj["hash"], fp, ek)


# --- package container --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Package:
    manifest_raw: bytes
    manifest: Manifest
    signature: bytes
    header_raw: bytes
    header: Header
    keyblock: KeyBlock
    ciphertext: memoryview | bytes

    def to_bytes(self) -> bytes:
        kb = self.keyblock.to_bytes()
        return b"".join([MAGIC, struct.pack(">I", len(self.manifest_raw)), self.manifest_raw,
                         struct.pack(">H", len(self.signature)), self.signature,
                         struct.pack(">I", len(self.header_raw)), self.header_raw,
                         struct.pack(">I", len(kb)), kb, bytes(self.ciphertext)])


def parse_package(data: bytes | memoryview, source: str = "package") -> Package:
    """Parse a package; `source` names the file in errors. Does not verify or decrypt."""
    mv = memoryview(data)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if n > len(mv) - pos:
            raise FormatError(f"{source}: truncated in {what}")
        out = mv[pos:pos + n]
        pos += n
        return out

    def field(lenfmt: str, limit: int, what: str) -> bytes:
        (n,) = struct.unpack(lenfmt, take(struct.calcsize(lenfmt), what + " length"))
        if n > limit:
            raise FormatError(f"{source}: {what} length {n} exceeds {limit}")
        return bytes(take(n, what))

    if bytes(take(len(MAGIC), "magic")) != MAGIC:
        raise FormatError(f"{source}: not an appliance model package (bad magic)")
    try:
        manifest_raw = field(">I", MAX_MANIFEST, "manifest")
        manifest = parse_manifest(manifest_raw)
        signature = field(">H", 64, "signature")
        if len(signature) != 64:
            raise FormatError("signature must be 64 bytes (Ed25519)")
        header_raw = field(">I", MAX_HEADER, "header")
        header = parse_header(header_raw)
        keyblock = parse_keyblock(field(">I", MAX_KEYBLOCK, "key block"))
    except FormatError as e:
        msg = str(e)
        raise FormatError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    ct = mv[pos:]
    if len(ct) != header.ciphertext_size():
        raise FormatError(f"{source}: ciphertext is {len(ct)} bytes, header says "
                          f"{header.ciphertext_size()} (truncated or padded file)")
    if header.plaintext_size != manifest.size:
        raise FormatError(f"{source}: header plaintext size differs from the manifest size")
    return Package(manifest_raw, manifest, signature, header_raw, header, keyblock, ct)


# --- crypto ------------------------------------------------------------------------------------
def _aad(header_hash: bytes, index: int, last: bool) -> bytes:
    return header_hash + struct.pack(">IB", index, 1 if last else 0)


def device_key_fingerprint(public_key_pem: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_key_pem)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _oaep(hash_name: str):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    h = {"SHA-1": hashes.SHA1, "SHA-256": hashes.SHA256, "SHA-384": hashes.SHA384,
         "SHA-512": hashes.SHA512}[hash_name]
    return padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)


def wrap_data_key(data_key: bytes, device_public_pem: bytes, oaep_hash: str = "SHA-1") -> KeyBlock:
    """Encrypt the data key to a device public key (host side: no private key needed)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if oaep_hash not in OAEP_HASHES:
        raise FormatError(f"OAEP hash must be one of {', '.join(OAEP_HASHES)}")
    try:
        pub = serialization.load_pem_public_key(device_public_pem)
    except ValueError:
        raise FormatError("device public key is not a PEM public key") from None
    if not isinstance(pub, rsa.RSAPublicKey) or pub.key_size < 2048:
        raise FormatError("device public key must be RSA, at least 2048 bits")
    return KeyBlock(oaep_hash, device_key_fingerprint(device_public_pem),
                    pub.encrypt(data_key, _oaep(oaep_hash)))


def encrypt(plaintext: bytes, data_key: bytes, chunk_size: int = DEFAULT_CHUNK,
            nonce_prefix: bytes | None = None) -> tuple[bytes, bytes]:
    """Return (header_raw, ciphertext)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = Header(chunk_size, nonce_prefix or os.urandom(8), len(plaintext))
    header_raw = header.to_bytes()
    hh = hashlib.sha256(header_raw).digest()
    aes = AESGCM(data_key)
    mv = memoryview(plaintext)
    out = []
    for i in range(header.chunks):
        piece = mv[i * chunk_size:(i + 1) * chunk_size]
        out.append(aes.encrypt(header.nonce_prefix + struct.pack(">I", i), piece,
                               _aad(hh, i, i == header.chunks - 1)))
    return header_raw, b"".join(out)


def decrypt(header_raw: bytes, header: Header, ciphertext, data_key: bytes) -> bytes:
    """Decrypt all chunks into one in-memory bytes object (plaintext never touches disk).

    Decrypts in place into one buffer and makes one bytes copy at the end: measured here, many
    per-chunk bytes objects + join cost up to 30x more (allocator page faults) than this."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if header.chunks == 1:
        if len(data_key) != 32:
            raise IntegrityError("unwrapped data key is not 32 bytes")
        try:
            return AESGCM(data_key).decrypt(header.nonce_prefix + struct.pack(">I", 0), ciphertext,
                                            _aad(hashlib.sha256(header_raw).digest(), 0, True))
        except InvalidTag:
            raise IntegrityError("chunk 0 failed AES-GCM authentication "
                                 "(ciphertext altered, truncated or reordered)") from None
    buf = bytearray(header.plaintext_size)
    decrypt_into(header_raw, header, ciphertext, data_key, buf)
    return bytes(buf)


def decrypt_into(header_raw: bytes, header: Header, ciphertext, data_key: bytes, out) -> None:
    """Decrypt straight into a writable buffer of plaintext_size bytes (e.g. an mmap of a memfd):
    no intermediate copy. On failure the buffer holds partial plaintext: the caller discards it."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(data_key) != 32:
        raise IntegrityError("unwrapped data key is not 32 bytes")
    hh = hashlib.sha256(header_raw).digest()
    aes = AESGCM(data_key)
    ct, dst = memoryview(ciphertext), memoryview(out)
    step = header.chunk_size + TAG
    failed = None
    for i in range(header.chunks):
        start = i * header.chunk_size
        n = min(header.chunk_size, header.plaintext_size - start)
        try:
            aes.decrypt_into(header.nonce_prefix + struct.pack(">I", i), ct[i * step:i * step + n + TAG],
                             _aad(hh, i, i == header.chunks - 1), dst[start:start + n])
        except InvalidTag:
            failed = i
            break
    # Release our views before raising: an exception holding them would keep the caller's
    # mmap from closing (BufferError instead of the real reason).
    dst.release()
    ct.release()
    if failed is not None:
        raise IntegrityError(f"chunk {failed} failed AES-GCM authentication "
                             "(ciphertext altered, truncated or reordered)")


def build_package(plaintext: bytes, manifest: Manifest, signing_key, device_public_pem: bytes,
                  oaep_hash: str = "SHA-1", chunk_size: int = DEFAULT_CHUNK) -> bytes:
    """Host side: encrypt `plaintext` for one device and sign its manifest."""
    if manifest.sha256 != hashlib.sha256(plaintext).hexdigest() or manifest.size != len(plaintext):
        raise FormatError("manifest sha256/size do not describe the plaintext")
    parse_manifest(manifest.to_bytes())  # validate fields before signing
    data_key = os.urandom(32)
    keyblock = wrap_data_key(data_key, device_public_pem, oaep_hash)
    header_raw, ct = encrypt(plaintext, data_key, chunk_size)
    mraw = manifest.to_bytes()
    return Package(mraw, manifest, sign_manifest(manifest, signing_key), header_raw,
                   parse_header(header_raw), keyblock, ct).to_bytes()


def unwrap_data_key(keyblock: KeyBlock, backend) -> bytes:
    """Device side: check the key block targets this device, then decrypt on the token."""
    mine = device_key_fingerprint(backend.public_key_pem())
    if keyblock.device_key != mine:
        raise WrongDeviceError(f"package is encrypted for device key {keyblock.device_key[:16]}..., "
                               f"this device's key is {mine[:16]}...: package it for this device")
    return backend.decrypt_oaep(keyblock.data_key, keyblock.oaep_hash)


def rewrap(package_bytes: bytes, backend, new_public_pem: bytes, oaep_hash: str | None = None) -> bytes:
    """Key rotation: re-encrypt only the data key to `new_public_pem`; chunks are untouched."""
    pkg = parse_package(package_bytes)
    data_key = unwrap_data_key(pkg.keyblock, backend)
    kb = wrap_data_key(data_key, new_public_pem, oaep_hash or pkg.keyblock.oaep_hash)
    return dataclasses.replace(pkg, keyblock=kb).to_bytes()
