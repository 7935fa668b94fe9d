"""Anti-rollback counters: the highest accepted version per model name.

PKCS#11 has no monotonic counter, so the store talks to this interface:

* `TokenMacFileCounter` (SoftHSM2 / QEMU, and any PKCS#11 token): a JSON file on the data
  partition authenticated with HMAC-SHA256 under a generic secret generated on the token
  (sensitive, non-extractable). Forging or editing the file is detected, and deleting it is
  detected too (the MAC key on the token marks the counter as initialised). Its limit: an
  attacker with root on the data partition can REPLAY an older, validly MACed copy of the file.
  That is why production devices use one of:
* TPM 2.0 NV counter (x86-mini with tpm2-pkcs11): an NV index of type TPM_NT_COUNTER, only
  incremented, one per model name or a hash chain over all names; read with TPM2_NV_Read.
* OP-TEE RPMB secure storage (RK3588 with libckteec): a TA-owned persistent object in RPMB,
  whose write counter the eMMC enforces, so replay is impossible.
Both need hardware that does not exist on this build host; they plug in here by implementing
`get`/`advance`.
"""
from __future__ import annotations

import abc
import hmac
import json
import os
from pathlib import Path

from .envelope import canonical_json, parse_version
from .errors import CounterError, FormatError
from .fsutil import atomic_write

DOMAIN = b"appliance-counter-v1\0"


class MonotonicCounter(abc.ABC):
    @abc.abstractmethod
    def get(self, name: str) -> tuple[int, ...] | None:
        """Highest accepted version for `name`, or None if none accepted yet."""

    @abc.abstractmethod
    def advance(self, name: str, version: str) -> None:
        """Record `version` as accepted; never lowers the value."""

    @abc.abstractmethod
    def all(self) -> dict[str, str]:
        """Every name with its highest accepted version string."""


class TokenMacFileCounter(MonotonicCounter):
    def __init__(self, path: str | os.PathLike, backend):
        self.path = Path(path)
        self.backend = backend
        # (backend, bytes, counters) last authenticated by the token: the same bytes need no second
        # token operation (the MAC key is fixed for the token's life). Every load still reads
        # the file, so a swapped counter is checked again.
        self._verified: tuple[object, bytes, dict[str, str]] | None = None

    def _read(self) -> dict[str, str]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            if self.backend.has_mac_key():
                raise CounterError(f"anti-rollback counter {self.path} is missing but the token says it "
                                   "was initialised: restore it or re-provision the device") from None
            return {}
        except OSError as e:
            raise CounterError(f"cannot read counter {self.path}: {e.strerror}") from None
        if self._verified is not None and self._verified[0] is self.backend and self._verified[1] == raw:
            return dict(self._verified[2])
        body, sep, tag = raw.rpartition(b"\n")
        if not sep or not hmac.compare_digest(self.backend.mac(DOMAIN + body).hex().encode(), tag):
            raise CounterError(f"anti-rollback counter {self.path} failed authentication "
                               "(edited or from another device): refusing to guess versions")
        try:
            obj = json.loads(body)
            counters = obj["counters"]
            if obj.get("format") != 1 or not isinstance(counters, dict):
                raise ValueError
            for k, v in counters.items():
                parse_version(v)
        except (ValueError, KeyError, TypeError, FormatError):
            raise CounterError(f"anti-rollback counter {self.path} is malformed") from None
        self._verified = (self.backend, raw, dict(counters))
        return counters

    def get(self, name):
        v = self._read().get(name)
        return parse_version(v) if v is not None else None

    def all(self):
        return dict(self._read())

    def advance(self, name, version):
        counters = self._read()
        cur = counters.get(name)
        if cur is not None and parse_version(cur) >= parse_version(version):
            return
        counters[name] = version
        body = canonical_json({"format": 1, "counters": counters})
        atomic_write(self.path, body + b"\n" + self.backend.mac(DOMAIN + body).hex().encode(), mode=0o640)
