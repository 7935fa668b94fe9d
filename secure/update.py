"""`appliance-agent update install|mark-good|status`: signed A/B updates on the device.

An update bundle is an uncompressed tar written by `build-image` (NAME.update):

    update.json        board, variant, version, root image size/sha256/verity, boot files,
                       the kernel arguments of each slot
    update.json.sig    base64 Ed25519 signature of update.json by the build key
    boot/...           kernel, initrd (and DTBs) for the slot's directory on the boot partition
    root.img           erofs root with its dm-verity hash tree appended

It is read as a stream (from a file, a USB stick's block device, or stdin) and checked before
anything is written: the signature against the build key baked into the image
(/etc/appliance/build-key.pub.pem), the board, and the version (older than the running one:
refused). Then, in this order, each step safe to interrupt by a power cut:

    1. the inactive slot is taken out of the boot order (a half-written slot is never tried)
    2. its root partition and boot files are written, each checked against update.json
    3. the boot order puts it first with a full set of tries; the next boot tries it
    4. once that boot is healthy, `mark-good` (appliance-update-bless.service) keeps it;
       a slot that never becomes healthy runs out of tries and the boot script falls back.

Exit status: 0 done (or nothing to do), 2 usage, 3 bad signature, 4 older version,
5 wrong board, 6 integrity (a size or sha256 differs), 10 malformed bundle, 1 anything else.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import slots
from .errors import SecureError
from .fsutil import fsync_dir

PROG = "appliance-agent update"
FORMAT = 1
CHUNK = 4 << 20
MAX_HEADER = 1 << 20


class UpdateError(SecureError):
    code = 1


class BundleFormatError(UpdateError):
    code = 10


class BundleSignatureError(UpdateError):
    code = 3


class VersionError(UpdateError):
    code = 4


class BoardError(UpdateError):
    code = 5


class IntegrityError(UpdateError):
    code = 6


@dataclass(frozen=True)
class Device:
    """Where the device keeps what an update reads and writes (paths overridable for tests)."""

    pubkey: Path = Path("/etc/appliance/build-key.pub.pem")
    manifest: Path = Path("/etc/appliance/manifest.json")
    cmdline: Path = Path("/proc/cmdline")
    boot: Path = Path(slots.BOOT_PARTITION)
    root_devices: tuple[tuple[str, Path], ...] = (
        ("a", Path("/dev/disk/by-partlabel/root-a")), ("b", Path("/dev/disk/by-partlabel/root-b")))

    def root_device(self, slot: str) -> Path:
        return dict(self.root_devices)[slot]


def parse_version(v: str) -> tuple[int, ...]:
    parts = re.split(r"[.\-+]", v.strip())
    if not v.strip() or not all(p.isdigit() for p in parts):
        raise BundleFormatError(f"version {v!r} is not dotted numbers (like 1.4.2)")
    return tuple(int(p) for p in parts)


def verify_header(header: bytes, signature: bytes, pubkey_pem: bytes) -> dict:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pub = serialization.load_pem_public_key(pubkey_pem)
    if not isinstance(pub, Ed25519PublicKey):
        raise UpdateError("the image's build key is not an Ed25519 public key")
    try:
        pub.verify(base64.b64decode(signature.strip(), validate=True), header)
    except (InvalidSignature, ValueError):
        raise BundleSignatureError("bundle signature does not verify against this image's build key "
                                   "(built with another key, or modified): refused") from None
    try:
        meta = json.loads(header)
    except ValueError:
        raise BundleFormatError("update.json is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleFormatError(f"update.json format {meta.get('format') if isinstance(meta, dict) else '?'}"
                                f" is not {FORMAT}: this agent is too old or the bundle is not an update")
    for k in ("board", "version", "root", "boot", "slot_env"):
        if k not in meta:
            raise BundleFormatError(f"update.json has no {k!r}")
    return meta


def check_applicable(meta: dict, running: dict, running_roothash: str | None) -> str:
    """'install' or 'current' (this very build is running); raises for refusals."""
    want = (running.get("board"), running.get("variant"))
    got = (meta.get("board"), meta.get("variant"))
    if want != got:
        raise BoardError(f"bundle is for board {got[0]}{'/' + got[1] if got[1] else ''}, this device is "
                         f"{want[0]}{'/' + want[1] if want[1] else ''}: refused")
    new, cur = parse_version(str(meta["version"])), parse_version(str(running.get("version", "0")))
    if new < cur:
        raise VersionError(f"bundle version {meta['version']} is older than the running {running.get('version')}: "
                           "refused (no downgrades)")
    if new == cur:
        if meta["root"].get("verity", {}).get("roothash") == running_roothash:
            return "current"
        raise VersionError(f"bundle version {meta['version']} equals the running version but is a different "
                           "build: refused (give the new build a higher --image-version)")
    return "install"


def _member(tf: tarfile.TarFile, want: str) -> tarfile.TarInfo:
    ti = tf.next()
    if ti is None or ti.name != want or not ti.isfile():
        raise BundleFormatError(f"bundle: expected {want} next, found {ti.name if ti else 'the end'}")
    return ti


def _read_small(tf: tarfile.TarFile, name: str) -> bytes:
    ti = _member(tf, name)
    if ti.size > MAX_HEADER:
        raise BundleFormatError(f"bundle: {name} is {ti.size} bytes (at most {MAX_HEADER})")
    return tf.extractfile(ti).read()


def _copy_hashed(src, dst_fd: int, size: int, progress=None, label: str = "") -> str:
    h, done, last = hashlib.sha256(), 0, -1
    while done < size:
        buf = src.read(min(CHUNK, size - done))
        if not buf:
            raise BundleFormatError(f"bundle ends inside {label}")
        h.update(buf)
        mv = memoryview(buf)
        while mv:
            n = os.write(dst_fd, mv)
            mv = mv[n:]
        done += len(buf)
        pct = done * 100 // size
        if progress and pct // 10 != last:
            last = pct // 10
            progress(f"writing {label}: {pct}%")
    return h.hexdigest()


def _hash_device(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        left = size
        while left:
            buf = f.read(min(CHUNK, left))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def _device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _safe_rel(name: str) -> str:
    rel = name[len("boot/"):]
    if not name.startswith("boot/") or not rel or rel.startswith("/") or ".." in rel.split("/"):
        raise BundleFormatError(f"bundle: unexpected member {name!r}")
    return rel


def _fsync_tree(d: Path) -> None:
    for dirpath, _, files in os.walk(d):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fsync_dir(dirpath)


def install(bundle, dev: Device = Device(), progress=print) -> str:
    """Install the bundle (path, or a binary stream) into the inactive slot; returns the slot
    written, or '' when this very build is already running."""
    cmdline = dev.cmdline.read_text()
    booted = slots.booted_slot(cmdline)
    if booted not in slots.SLOTS:
        raise UpdateError(f"{dev.cmdline}: no appliance.slot= (this system was not booted from an A/B slot)")
    running = json.loads(dev.manifest.read_text())
    roothash = (slots.cmdline_value(cmdline, "appliance.verity") or ":").split(":")[0]
    pub = dev.pubkey.read_bytes()
    fileobj = open(bundle, "rb") if isinstance(bundle, (str, os.PathLike)) else bundle
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tf:
            header = _read_small(tf, "update.json")
            sig = _read_small(tf, "update.json.sig")
            meta = verify_header(header, sig, pub)
            if check_applicable(meta, running, roothash) == "current":
                progress(f"version {meta['version']} (this build) is already running in slot {booted}: nothing to do")
                return ""
            target = slots.other(booted)
            progress(f"bundle {meta.get('image_name', meta['board'])} {meta['version']}: signature good; "
                     f"installing into slot {target} (running {running.get('version')} in slot {booted})")
            return _write_slot(tf, meta, target, dev, progress)
    except tarfile.TarError as e:
        raise BundleFormatError(f"bundle is not a valid update tar ({e})") from None
    finally:
        if fileobj is not bundle:
            fileobj.close()


def _write_slot(tf: tarfile.TarFile, meta: dict, target: str, dev: Device, progress) -> str:
    root_meta = meta["root"]
    expected_boot = {b["path"]: b for b in meta["boot"]}
    with slots.mounted_boot(dev.boot) as boot:
        backend = slots.for_boot(boot)
        backend.take_out(target)
        progress(f"slot {target} taken out of the boot order")
        # The target slot is out of the boot order: its old files can go first (the partition
        # holds two slots, not three).
        staging = boot / f"{target}.new"
        for old in (staging, boot / target):
            shutil.rmtree(old, ignore_errors=True)
        need = sum(int(b["bytes"]) for b in meta["boot"]) + (1 << 20)
        st = os.statvfs(boot)
        if st.f_bavail * st.f_frsize < need:
            raise UpdateError(f"boot partition: {need >> 20} MiB needed for slot {target}'s kernel and initrd, "
                              f"{st.f_bavail * st.f_frsize >> 20} MiB free (the image's boot partition is too "
                              "small for two slots; reflash with a newer image)")
        staging.mkdir()
        seen_root = False
        # tf.next(), not iteration: iterating a stream re-yields the members already read.
        while (ti := tf.next()) is not None:
            if ti.name == "root.img":
                _write_root(tf, ti, root_meta, dev.root_device(target), target, progress)
                seen_root = True
                continue
            if ti.isdir():
                continue
            rel = _safe_rel(ti.name)
            want = expected_boot.pop(rel, None)
            if want is None or not ti.isfile():
                raise BundleFormatError(f"bundle: {ti.name} is not listed in update.json")
            out = staging / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                got = _copy_hashed(tf.extractfile(ti), fd, ti.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            if got != want["sha256"] or ti.size != want["bytes"]:
                raise IntegrityError(f"bundle: {ti.name} does not match update.json (sha256/size): refused")
        if expected_boot or not seen_root:
            missing = sorted(expected_boot) + ([] if seen_root else ["root.img"])
            raise BundleFormatError(f"bundle: missing {', '.join(missing)}")
        env_text = meta["slot_env"].get(target)
        if not env_text or f"appliance.slot={target}" not in env_text:
            raise BundleFormatError(f"update.json: no kernel arguments for slot {target}")
        backend.stage(staging, target, env_text)
        _fsync_tree(staging)
        final = boot / target
        os.rename(staging, final)
        fsync_dir(boot)
        progress(f"slot {target} written and verified; switching")
        backend.activate(target, env_text)
        progress(f"switched: the next boot tries slot {target} ({slots.BOOT_TRIES} tries, then back to "
                 f"slot {slots.other(target)})")
    return target


def _write_root(tf, ti, root_meta: dict, device: Path, target: str, progress) -> None:
    size = int(root_meta["bytes"])
    if ti.size != size:
        raise IntegrityError(f"bundle: root.img is {ti.size} bytes, update.json says {size}: refused")
    cap = _device_size(device)
    if size > cap:
        raise UpdateError(f"root image ({size} bytes) does not fit {device} ({cap} bytes)")
    fd = os.open(device, os.O_WRONLY)
    try:
        got = _copy_hashed(tf.extractfile(ti), fd, size, progress, f"root-{target}")
        os.fsync(fd)
    finally:
        os.close(fd)
    if got != root_meta["sha256"]:
        raise IntegrityError(f"bundle: root.img sha256 {got[:16]}… is not update.json's: refused")
    # Read back what the storage holds, not what was sent to it.
    if _hash_device(device, size) != root_meta["sha256"]:
        raise IntegrityError(f"{device}: read-back of the written root does not match: storage fault?")


def status(dev: Device = Device()) -> dict:
    cmdline = dev.cmdline.read_text()
    booted = slots.booted_slot(cmdline)
    with slots.mounted_boot(dev.boot) as boot:
        backend = slots.for_boot(boot)
        st = backend.state()
    running = json.loads(dev.manifest.read_text())
    return {"booted": booted, "version": running.get("version"), "boot": backend.name, "order": list(st.order),
            "tries": {s: st.tries(s) for s in slots.SLOTS}, "next": st.next_slot()}


def healthy(url: str | None, timeout: float) -> bool:
    if not url:
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(2)


def mark_good(dev: Device = Device()) -> str:
    booted = slots.booted_slot(dev.cmdline.read_text())
    if booted not in slots.SLOTS:
        raise UpdateError(f"{dev.cmdline}: no appliance.slot= (this system was not booted from an A/B slot)")
    with slots.mounted_boot(dev.boot) as boot:
        slots.for_boot(boot).mark_good(booted)
    return booted


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="signed A/B system updates")
    p.add_argument("--boot", type=Path, default=Device.boot, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install", help="write a signed bundle to the inactive slot and switch to it")
    i.add_argument("bundle", help="bundle file or block device ('-': stdin)")
    i.add_argument("--reboot", action="store_true", help="reboot into the new slot when done")
    g = sub.add_parser("mark-good", help="keep the booted slot (after a healthy boot)")
    g.add_argument("--health-url", help="wait for HTTP 200 from this URL first")
    g.add_argument("--timeout", type=float, default=300)
    g.add_argument("--reboot-on-failure", action="store_true",
                   help="unhealthy: reboot (the boot script spends a try) if another slot can boot")
    s = sub.add_parser("status", help="booted slot, boot order, tries left")
    s.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    dev = Device(boot=a.boot)
    try:
        if a.cmd == "install":
            src = sys.stdin.buffer if a.bundle == "-" else a.bundle
            slot = install(src, dev, progress=lambda m: print(m, flush=True))
            if slot and a.reboot:
                subprocess.run(["systemctl", "reboot"], check=False)
            return 0
        if a.cmd == "mark-good":
            if not healthy(a.health_url, a.timeout):
                msg = f"not healthy ({a.health_url} did not answer 200 within {a.timeout:.0f} s)"
                st = status(dev)
                other = slots.other(st["booted"]) if st["booted"] in slots.SLOTS else None
                if a.reboot_on_failure and other and st["tries"][other] > 0 and other in st["order"]:
                    print(f"{PROG}: error: {msg}: rebooting to spend a try", file=sys.stderr, flush=True)
                    subprocess.run(["systemctl", "reboot"], check=False)
                else:
                    print(f"{PROG}: error: {msg}; slot not marked good", file=sys.stderr)
                return 1
            slot = mark_good(dev)
            print(f"slot {slot} marked good", flush=True)
            return 0
        st = status(dev)
        if a.json:
            print(json.dumps(st, sort_keys=True))
        else:
            print(f"booted slot {st['booted']} (version {st['version']}); order {' '.join(st['order'])}; "
                  f"tries a={st['tries']['a']} b={st['tries']['b']}; next boot: {st['next']}")
        return 0
    except UpdateError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    except (SecureError, OSError, ValueError, KeyError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
