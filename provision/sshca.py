"""Issue OpenSSH certificates from the factory CA with `ssh-keygen -s`, on the station.

The CA private key is only ever read by ssh-keygen here; nothing derived from it but the
certificate itself goes to a device.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import subprocess
import tempfile
from pathlib import Path

from .errors import ProvisionError


def fingerprint(openssh_line: str) -> str:
    """SHA256:... fingerprint of an OpenSSH public key or certificate line."""
    parts = openssh_line.split()
    if len(parts) < 2:
        raise ProvisionError(f"not an OpenSSH public key: {openssh_line[:40]!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise ProvisionError(f"not an OpenSSH public key: {openssh_line[:40]!r}") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_public_key(line: str, what: str) -> str:
    line = line.strip()
    if not line.startswith(("ssh-ed25519 ", "ssh-rsa ", "ecdsa-sha2-")) or "\n" in line:
        raise ProvisionError(f"{what} is not an OpenSSH public key: {line[:60]!r}")
    fingerprint(line)
    return line


def sign(ca_key: Path, public_key: str, *, identity: str, principals: list[str], host: bool,
         validity: str, timeout: float = 30) -> tuple[str, int]:
    """Return (certificate line, serial number) for PUBLIC_KEY."""
    serial = secrets.randbits(63)
    with tempfile.TemporaryDirectory(prefix="provision-ca-") as td:
        pub = Path(td) / "key.pub"
        pub.write_text(public_key.strip() + "\n")
        cmd = ["ssh-keygen", "-q", "-s", str(ca_key), "-I", identity, "-n", ",".join(principals),
               "-V", validity, "-z", str(serial)]
        if host:
            cmd.append("-h")
        try:
            p = subprocess.run(cmd + [str(pub)], capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ProvisionError(f"{ca_key}: ssh-keygen -s timed out (is the CA key passphrase-protected?)") from None
        if p.returncode != 0:
            msg = " ".join((p.stderr or p.stdout).split()) or f"exit {p.returncode}"
            raise ProvisionError(f"{ca_key}: signing with the factory CA failed: {msg}")
        cert = (Path(td) / "key-cert.pub").read_text().strip()
    return cert, serial
