"""Model sources: where the runtime gets .tflite bytes from.

The interface (duck-typed, shared with ``appliance.secure.source.SecureModelSource``):

    source.names() -> list[str]           # model names this source can load now
    source.load(name) -> ModelBlob-like   # .name: str, .version: str, .content: bytes
                                          # raises an exception whose str() is a one-line reason

Bytes are handed over in memory so a decrypting source never writes plaintext to disk.
``version`` is what hot reload compares: a source must change it when the content changes.
A source may also offer ``version(name) -> str``, a cheap look at the version it would load
(the secure store reads it from the package without decrypting); hot reload then calls
``load`` only when that differs from the version being served.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelLoadError(Exception):
    """One-line reason a model cannot be loaded."""


@dataclass(frozen=True)
class ModelBlob:
    name: str
    version: str
    content: bytes


class ModelSource(Protocol):
    def names(self) -> list[str]: ...

    def load(self, name: str) -> ModelBlob: ...


class DirectorySource:
    """Plain ``NAME.tflite`` files in a directory. Version = first 12 hex of the content's
    sha256 (a file rewritten in place with new weights is a new version; a touched file is not)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"DirectorySource({str(self.directory)!r})"

    def names(self) -> list[str]:
        try:
            files = sorted(self.directory.glob("*.tflite"))
        except OSError as e:
            raise ModelLoadError(f"cannot list model dir {self.directory}: {e.strerror}") from None
        return [p.stem for p in files if p.is_file() and NAME_RE.match(p.stem)]

    def load(self, name: str) -> ModelBlob:
        if not NAME_RE.match(name):
            raise ModelLoadError(f"invalid model name {name!r}")
        path = self.directory / f"{name}.tflite"
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: no such file") from None
        except OSError as e:
            raise ModelLoadError(f"{path}: {e.strerror}") from None
        if not content:
            raise ModelLoadError(f"{path}: empty file")
        return ModelBlob(name=name, version=hashlib.sha256(content).hexdigest()[:12], content=content)


class MultiSource:
    """Several sources in priority order (e.g. the secure store first, then a plain dir)."""

    def __init__(self, sources: list[ModelSource]):
        self.sources = list(sources)

    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.sources:
            for n in s.names():
                seen.setdefault(n, None)
        return list(seen)

    def load(self, name: str) -> ModelBlob:
        return self._owner(name).load(name)

    def version(self, name: str) -> str:
        owner = self._owner(name)
        peek = getattr(owner, "version", None)
        if peek is None:
            raise ModelLoadError(f"{owner!r} has no cheap version check")
        return peek(name)

    def _owner(self, name: str) -> ModelSource:
        for s in self.sources:
            if name in s.names():
                return s
        raise ModelLoadError(f"model {name!r} is in no source")
