"""Board definitions: boards/NAME.toml (+ NAME.power.toml), validated into one model.

Validation happens here, at the edge; everything downstream takes a `Board`.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import BuildError

Arch = Literal["arm64", "amd64"]
DEB_ARCH_TO_QEMU = {"arm64": "aarch64", "amd64": "x86_64"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Variant(_Strict):
    description: str = ""
    dtb: str | None = None


class Cpu(_Strict):
    cores: int = Field(ge=1, le=256)
    big: list[int]
    little: list[int] = []

    @model_validator(mode="after")
    def _cores_in_range(self) -> "Cpu":
        for c in self.big + self.little:
            if not 0 <= c < self.cores:
                raise ValueError(f"core {c} is outside 0..{self.cores - 1}")
        if set(self.big) & set(self.little):
            raise ValueError("a core cannot be both big and little")
        return self


class Modules(_Strict):
    initramfs: list[str] = []
    keep: list[str] = Field(min_length=1)


class Disk(_Strict):
    first_partition_mib: int = Field(default=1, ge=1)
    boot_mib: int = Field(ge=16)
    root_mib: int = Field(ge=64)
    data_mib: int = Field(ge=16)


class Blob(_Strict):
    file: str
    sector: int = Field(ge=1)
    max_bytes: int = Field(ge=512)

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if "/" in v or v in ("", ".", ".."):
            raise ValueError("must be a plain file name inside the --bootloader directory")
        return v


class Bootloader(_Strict):
    blobs: list[Blob]
    required: bool = False


class Qemu(_Strict):
    system: str
    machine: str
    cpu: str
    smp: int = Field(default=2, ge=1)
    memory_mib: int = Field(default=1024, ge=256)
    firmware: str
    firmware_vars: str | None = None


class Secure(_Strict):
    pkcs11_module: str


class Board(_Strict):
    name: str
    description: str
    arch: Arch
    suite: str
    kernel_package: str
    boot: Literal["u-boot", "uefi"]
    console: str
    default_variant: str | None = None
    variants: dict[str, Variant] = {}
    cpu: Cpu
    modules: Modules
    disk: Disk
    bootloader: Bootloader | None = None
    qemu: Qemu | None = None
    secure: Secure | None = None
    # Owned and validated by appliance.power; carried here opaque so the image can ship it.
    power: dict | None = None

    @field_validator("console")
    @classmethod
    def _console(cls, v: str) -> str:
        if not re.fullmatch(r"tty[A-Za-z]+\d+,\d+", v):
            raise ValueError("expected DEVICE,BAUD such as ttyS2,1500000")
        return v

    @model_validator(mode="after")
    def _default_variant(self) -> "Board":
        if self.default_variant is not None and self.default_variant not in self.variants:
            raise ValueError(f"default_variant {self.default_variant!r} is not one of the variants")
        if self.bootloader:
            end = min(b.sector for b in self.bootloader.blobs)
            if end < 34:
                raise ValueError("bootloader blobs would overwrite the GPT (sector < 34)")
            first = self.disk.first_partition_mib * 2048
            for b in self.bootloader.blobs:
                if b.sector * 512 + b.max_bytes > first * 512:
                    raise ValueError(f"bootloader blob {b.file} may run into the first partition")
        return self


def default_boards_dir() -> Path:
    env = os.environ.get("APPLIANCE_BOARDS_DIR")
    if env:
        return Path(env)
    # Editable/source checkout: boards/ sits beside the image/ folder.
    return Path(__file__).resolve().parent.parent / "boards"


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{path}: field '{field}': {msg}{more}"


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise BuildError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise BuildError(f"{path}: cannot read: {e.strerror}") from None


def board_names(boards_dir: Path | None = None) -> list[str]:
    d = boards_dir or default_boards_dir()
    return sorted(p.stem for p in d.glob("*.toml") if not p.name.endswith(".power.toml"))


def load_board(name: str, boards_dir: Path | None = None) -> Board:
    d = boards_dir or default_boards_dir()
    path = d / f"{name}.toml"
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name) or not path.is_file():
        known = ", ".join(board_names(d)) or "none"
        raise BuildError(f"unknown board {name!r} (known: {known}; see build-image --list-boards)")
    data = _read_toml(path)
    power_path = d / f"{name}.power.toml"
    if power_path.is_file():
        data["power"] = _read_toml(power_path)
    try:
        board = Board.model_validate(data)
    except ValidationError as e:
        raise BuildError(_format_error(path, e)) from None
    if board.name != name:
        raise BuildError(f"{path}: field 'name': is {board.name!r} but the file is named {name!r}")
    return board


def resolve_variant(board: Board, variant: str | None) -> tuple[str | None, Variant | None]:
    if not board.variants:
        if variant:
            raise BuildError(f"board {board.name!r} has no variants (got --variant {variant})")
        return None, None
    chosen = variant or board.default_variant
    if chosen is None:
        raise BuildError(f"board {board.name!r} needs --variant, one of: {', '.join(board.variants)}")
    if chosen not in board.variants:
        raise BuildError(f"board {board.name!r} has no variant {chosen!r} (one of: {', '.join(board.variants)})")
    return chosen, board.variants[chosen]
