"""Host CLI `appliance-secure`:

  appliance-secure vendor-key OUT.pem                 new Ed25519 vendor key (+ OUT.pem.pub)
  appliance-secure package MODEL.tflite --name N --version V --board B [--board B2 ...]
        --device-pubkey PUB.pem --signing-key VENDOR_ED25519.pem
        [--watermark-key K --device-id ID] [--oaep-hash SHA-1|SHA-256] -o OUT.pkg
  appliance-secure watermark embed MODEL --key K --id DEVICE_ID -o OUT
  appliance-secure watermark verify SUSPECT --key K [--candidates INVENTORY] [--json]

Keys are files: K holds the watermark secret (any bytes, at least 16). DEVICE_ID is a 64-bit
id as 16 hex digits (or decimal). Prints one line per result; errors are one line on stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from . import errors as E
from .fsutil import atomic_write

PROG = "appliance-secure"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_device_id(text: str) -> int:
    t = text.strip().lower()
    try:
        if t.startswith("0x") or (len(t) == 16 and all(c in "0123456789abcdef" for c in t)):
            v = int(t[2:] if t.startswith("0x") else t, 16)
        else:
            v = int(t, 10)
    except ValueError:
        raise E.FormatError(f"device id {text!r} is not 16 hex digits or a decimal integer") from None
    if not 0 <= v < 1 << 64:
        raise E.FormatError(f"device id {text!r} does not fit in 64 bits")
    return v


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise E.SecureError(f"cannot read {what} {path}: {e.strerror}") from None


def _signing_key(path: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_pem_private_key(_read(path, "signing key"), password=None)
    except (ValueError, TypeError):
        raise E.FormatError(f"signing key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise E.FormatError(f"signing key {path} is not Ed25519")
    return key


def _watermark_key(path: str) -> bytes:
    key = _read(path, "watermark key")
    if len(key) < 16:
        raise E.FormatError(f"watermark key {path} is shorter than 16 bytes")
    return key


def build_parser():
    p = _Parser(prog=PROG, description="Package, sign, encrypt and watermark models for devices")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    v = sub.add_parser("vendor-key", help="create an Ed25519 vendor signing key")
    v.add_argument("out")
    k = sub.add_parser("package", help="encrypt a model for one device and sign its manifest")
    k.add_argument("model")
    k.add_argument("--name", required=True)
    k.add_argument("--version", required=True)
    k.add_argument("--board", action="append", required=True)
    k.add_argument("--device-pubkey", required=True)
    k.add_argument("--signing-key", required=True)
    k.add_argument("--watermark-key")
    k.add_argument("--device-id")
    k.add_argument("--oaep-hash", default="SHA-1", help="SHA-1 for SoftHSM 2.6, SHA-256 for TPM/OP-TEE")
    k.add_argument("--chunk-size", type=int, default=16 << 20)
    k.add_argument("-o", "--output", required=True)
    w = sub.add_parser("watermark", help="embed or verify a per-device watermark")
    ws = w.add_subparsers(dest="wcmd", required=True, parser_class=_Parser)
    we = ws.add_parser("embed")
    we.add_argument("model")
    we.add_argument("--key", required=True)
    we.add_argument("--id", required=True)
    we.add_argument("-o", "--output", required=True)
    wv = ws.add_parser("verify")
    wv.add_argument("model")
    wv.add_argument("--key", required=True)
    wv.add_argument("--candidates", help="inventory file: one device id per line (# comments)")
    wv.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    if args.cmd == "vendor-key":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = ed25519.Ed25519PrivateKey.generate()
        atomic_write(args.out, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        atomic_write(args.out + ".pub", key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), mode=0o644)
        print(f"wrote {args.out} and {args.out}.pub")
        return 0
    if args.cmd == "package":
        from .envelope import Manifest, build_package, parse_manifest

        model = _read(args.model, "model")
        wm_id = None
        if (args.watermark_key is None) != (args.device_id is None):
            raise E.FormatError("--watermark-key and --device-id go together")
        if args.watermark_key:
            from .watermark import embed
            dev = parse_device_id(args.device_id)
            model = embed(model, _watermark_key(args.watermark_key), dev).model
            wm_id = f"{dev:016x}"
        manifest = Manifest(args.name, args.version, hashlib.sha256(model).hexdigest(), len(model),
                            tuple(args.board), wm_id)
        parse_manifest(manifest.to_bytes())
        pkg = build_package(model, manifest, _signing_key(args.signing_key),
                            _read(args.device_pubkey, "device public key"), args.oaep_hash, args.chunk_size)
        atomic_write(args.output, pkg, mode=0o644)
        print(f"packaged {args.name} {args.version} for {','.join(args.board)} -> {args.output} "
              f"({len(pkg)} bytes, sha256 {manifest.sha256[:16]}, watermark {wm_id or '-'})")
        return 0
    if args.cmd == "watermark":
        from . import watermark as W

        key = _watermark_key(args.key)
        if args.wcmd == "embed":
            res = W.embed(_read(args.model, "model"), key, parse_device_id(args.id))
            atomic_write(args.output, res.model, mode=0o644)
            print(f"embedded id {parse_device_id(args.id):016x} in {res.n_weights} weights of "
                  f"{res.n_tensors} tensors -> {args.output}")
            return 0
        cands = None
        if args.candidates:
            lines = _read(args.candidates, "candidates").decode(errors="replace").splitlines()
            cands = [parse_device_id(s.split("#")[0]) for s in lines if s.split("#")[0].strip()]
        r = W.verify(_read(args.model, "model"), key, candidates=cands)
        if args.json:
            print(json.dumps(r.as_dict()))
        else:
            print(r.summary())
        return 0 if r.detected else 1
    raise AssertionError(args.cmd)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return run(args)
    except E.SecureError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
