"""`SecureModelSource`: the encrypted store seen through the runtime's model-source interface
(`names() -> list[str]`, `load(name) -> obj` with `.name`, `.version`, `.content: bytes`;
failures raise an exception whose str() is a one-line reason)."""
from __future__ import annotations

import os

from .backend import Pkcs11Backend, TokenConfig
from .errors import StoreError
from .store import DEFAULT_BOARD_FILE, DEFAULT_STORE_DIR, DEFAULT_VENDOR_KEY, DeviceStore, \
    LoadedModel, board_name_from_file, load_vendor_public_key


class SecureModelSource:
    def __init__(self, store: DeviceStore):
        self.store = store
        self._versions: dict[str, tuple[tuple, str]] = {}

    @classmethod
    def from_config(cls, *, module: str, token_label: str, pin_file: str | None = None,
                    pin: str | None = None, store_dir: str = DEFAULT_STORE_DIR,
                    vendor_key: str = DEFAULT_VENDOR_KEY, board: str | None = None,
                    board_file: str = DEFAULT_BOARD_FILE) -> "SecureModelSource":
        backend = Pkcs11Backend(TokenConfig(module=module, token_label=token_label, pin=pin, pin_file=pin_file))
        return cls(DeviceStore(store_dir, backend, load_vendor_public_key(vendor_key),
                               board or board_name_from_file(board_file)))

    @classmethod
    def from_env(cls, environ=os.environ) -> "SecureModelSource":
        """Same variables as `appliance-agent store` (see appliance.secure.agent)."""
        from .agent import DEFAULTS, _module_default, use_default_token_config
        use_default_token_config(environ)
        g = lambda k: environ.get(k) or DEFAULTS[k]  # noqa: E731
        # module: env, else the board file's [secure] pkcs11_module, else SoftHSM2 (as the agent)
        module = _module_default(environ, g("APPLIANCE_BOARD_FILE"))
        return cls.from_config(module=module, token_label=g("APPLIANCE_TOKEN_LABEL"),
                               pin_file=g("APPLIANCE_PIN_FILE"), store_dir=g("APPLIANCE_STORE_DIR"),
                               vendor_key=g("APPLIANCE_VENDOR_KEY"), board=environ.get("APPLIANCE_BOARD"),
                               board_file=g("APPLIANCE_BOARD_FILE"))

    def names(self) -> list[str]:
        return self.store.names()

    def load(self, name: str) -> LoadedModel:
        return self.store.load(name)

    def version(self, name: str) -> str:
        """The installed version as the package's manifest states it, without the token or a
        decrypt: the runtime's hot reload asks every few seconds and only calls `load` (which
        verifies everything) when this differs from what it serves. Cached per file identity."""
        path = self.store._path(name)
        try:
            st = os.stat(path)
        except OSError as e:
            raise StoreError(f"cannot stat {path}: {e.strerror}") from None
        ident = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        hit = self._versions.get(name)
        if hit is not None and hit[0] == ident:
            return hit[1]
        v = self.store.peek_manifest(name).version
        self._versions[name] = (ident, v)
        return v

    def load_memfd(self, name: str):
        """(fd, manifest): the plaintext in a sealed memfd; TFLite can load /proc/self/fd/FD."""
        return self.store.load_memfd(name)
