"""The build configuration: board + variant + profile merged and validated once."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .boards import Board, Variant, board_names, load_board, resolve_variant
from .errors import BuildError

Profile = Literal["production", "debug"]
PROFILES: tuple[str, ...] = ("production", "debug")

DEFAULT_MIRROR = "http://deb.debian.org/debian"
# A fixed build date keeps artefacts comparable between builds of the same inputs.
DEFAULT_SOURCE_DATE_EPOCH = 1767225600  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class BuildConfig:
    board: Board
    variant_name: str | None
    variant: Variant | None
    profile: Profile
    out_dir: Path
    mirror: str = DEFAULT_MIRROR
    bootloader_dir: Path | None = None
    source_date_epoch: int = DEFAULT_SOURCE_DATE_EPOCH
    image_version: str = "0.1.0"
    # Boards of the same arch and suite share one rootfs (see rootfs.plan_rootfs).
    peers: tuple[Board, ...] = ()
    templates_overlay: Path | None = None
    # Ship the frozen appliance-agent (runtime, power, secure) under /opt/appliance.
    with_agent: bool = True
    # Factory-default content of the data partition (models, configuration).
    data_tree: Path | None = None
    # Ed25519 build key; None: the one in the user's config dir, created on first use.
    signing_key: Path | None = None
    # The factory's SSH user CA (OpenSSH public key line): sshd trusts certificates it signed.
    ssh_ca: str | None = None
    # The model vendor's Ed25519 public key (PEM): the device store accepts packages it signed.
    vendor_key: str | None = None

    @property
    def image_name(self) -> str:
        return self.board.name if not self.variant_name else f"{self.board.name}-{self.variant_name}"

    @property
    def hostname(self) -> str:
        return self.image_name

    @property
    def dtb(self) -> str | None:
        return self.variant.dtb if self.variant else None


def make_config(
    board_name: str,
    *,
    variant: str | None = None,
    profile: str = "production",
    out_dir: Path | None = None,
    bootloader_dir: Path | None = None,
    mirror: str = DEFAULT_MIRROR,
    boards_dir: Path | None = None,
    image_version: str = "0.1.0",
    templates_overlay: Path | None = None,
    with_agent: bool = True,
    data_tree: Path | None = None,
    signing_key: Path | None = None,
    ssh_ca: Path | None = None,
    vendor_key: Path | None = None,
) -> BuildConfig:
    board = load_board(board_name, boards_dir)
    peers = tuple(
        b for b in (load_board(n, boards_dir) for n in board_names(boards_dir))
        if b.arch == board.arch and b.suite == board.suite
    )
    if data_tree is not None and not data_tree.is_dir():
        raise BuildError(f"--data-tree {data_tree}: not a directory")
    if templates_overlay is not None and not templates_overlay.is_dir():
        raise BuildError(f"--templates-overlay {templates_overlay}: not a directory")
    ssh_ca_line = read_ssh_ca(ssh_ca) if ssh_ca is not None else None
    vendor_pem = read_vendor_key(vendor_key) if vendor_key is not None else None
    vname, v = resolve_variant(board, variant)
    if profile not in PROFILES:
        raise BuildError(f"unknown profile {profile!r} (one of: {', '.join(PROFILES)})")
    if bootloader_dir is not None:
        if board.bootloader is None:
            raise BuildError(f"board {board.name!r} takes no bootloader blobs (--bootloader)")
        if not bootloader_dir.is_dir():
            raise BuildError(f"--bootloader {bootloader_dir}: not a directory")
        for blob in board.bootloader.blobs:
            p = bootloader_dir / blob.file
            if not p.is_file():
                raise BuildError(f"--bootloader {bootloader_dir}: missing {blob.file}")
            size = p.stat().st_size
            if size == 0 or size > blob.max_bytes:
                raise BuildError(
                    f"{p}: {size} bytes; must be 1..{blob.max_bytes} to fit before the next blob/partition"
                )
    elif board.bootloader is not None and board.bootloader.required:
        raise BuildError(f"board {board.name!r} needs --bootloader DIR with its boot blobs")
    name = board.name if not vname else f"{board.name}-{vname}"
    return BuildConfig(
        board=board,
        variant_name=vname,
        variant=v,
        profile=profile,  # type: ignore[arg-type]
        out_dir=(out_dir or Path("out") / name),
        mirror=mirror,
        bootloader_dir=bootloader_dir,
        image_version=image_version,
        peers=peers,
        templates_overlay=templates_overlay,
        with_agent=with_agent,
        data_tree=data_tree,
        signing_key=signing_key,
        ssh_ca=ssh_ca_line,
        vendor_key=vendor_pem,
    )


def read_vendor_key(path: Path) -> str:
    """The vendor's Ed25519 public key as PEM text; a private key never goes into an image."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = path.read_bytes()
    except OSError as e:
        raise BuildError(f"--vendor-key {path}: cannot read ({e.strerror})") from None
    if b"PRIVATE KEY" in data:
        raise BuildError(f"--vendor-key {path}: this is a private key; give the vendor's public key (PEM)")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise BuildError(f"--vendor-key {path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BuildError(f"--vendor-key {path}: not an Ed25519 key (model packages are signed with Ed25519)")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode().strip()


SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                 "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")


def read_ssh_ca(path: Path) -> str:
    """The CA's public key line; the private half must never end up in an image."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"--ssh-ca {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if "PRIVATE KEY" in text:
        raise BuildError(f"--ssh-ca {path}: this is a private key; give the CA's public key (the .pub file)")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1 or len(lines[0].split()) < 2 or lines[0].split()[0] not in SSH_KEY_TYPES:
        raise BuildError(f"--ssh-ca {path}: not one OpenSSH public key line (ssh-ed25519 AAAA... comment)")
    try:
        base64.b64decode(lines[0].split()[1], validate=True)
    except binascii.Error:
        raise BuildError(f"--ssh-ca {path}: the key's base64 part is corrupt") from None
    return lines[0]
