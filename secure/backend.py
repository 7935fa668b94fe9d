"""Token backends: where the device's private key lives.

The store needs three things from a token, all chosen because OP-TEE's PKCS#11 TA
(`libckteec`), `tpm2-pkcs11` and SoftHSM2 all offer them (none of the three shares
`CKM_AES_KEY_WRAP`, and tpm2-pkcs11 has no `C_WrapKey` at all):

* a per-device RSA key pair generated ON the token (sensitive, never extractable) whose
  public half is exported for provisioning;
* `C_Decrypt` with RSA-OAEP to recover a model's 32-byte data key (the OAEP hash is named in
  the package header: SoftHSM 2.6.1 only accepts SHA-1/MGF1-SHA1, production tokens SHA-256);
* a MAC under a token-held secret, used to authenticate the anti-rollback counter file.

Support is decided by trying the operation, never from `C_GetMechanismInfo` flags (SoftHSM
2.6.1 reports garbage there). Switching token is configuration (module path, label, PIN),
not code: the board file names the module.
"""
from __future__ import annotations

import abc
import dataclasses
import os
import threading
from pathlib import Path

from .errors import IntegrityError, TokenError, TokenLockedError, TokenMissingError

DEFAULT_KEY_LABEL = "appliance-device-key"
DEFAULT_MAC_LABEL = "appliance-counter-mac"
DEFAULT_TOKEN_LABEL = "appliance"
OAEP_HASHES = ("SHA-1", "SHA-256", "SHA-384", "SHA-512")


@dataclasses.dataclass(frozen=True)
class TokenConfig:
    """Which PKCS#11 token to use. `pin` wins over `pin_file` (tests pass it directly)."""

    module: str
    token_label: str = DEFAULT_TOKEN_LABEL
    pin: str | None = None
    pin_file: str | None = None
    key_label: str = DEFAULT_KEY_LABEL
    mac_label: str = DEFAULT_MAC_LABEL

    def read_pin(self) -> str:
        if self.pin is not None:
            return self.pin
        if not self.pin_file:
            raise TokenLockedError(
                f"no PIN for token {self.token_label!r}: pass --pin-file or set APPLIANCE_PIN_FILE")
        try:
            return Path(self.pin_file).read_text().strip()
        except OSError as e:
            raise TokenLockedError(f"cannot read PIN file {self.pin_file}: {e.strerror}") from None


class TokenBackend(abc.ABC):
    """What the store needs from a key store. Implementations: Pkcs11Backend (SoftHSM2,
    OP-TEE libckteec, tpm2-pkcs11)."""

    @abc.abstractmethod
    def ensure_device_key(self) -> bytes:
        """Create the device RSA key pair if absent (idempotent); return the public key PEM."""

    @abc.abstractmethod
    def public_key_pem(self) -> bytes:
        """Public half of the device key as SubjectPublicKeyInfo PEM."""

    @abc.abstractmethod
    def decrypt_oaep(self, ciphertext: bytes, hash_name: str) -> bytes:
        """RSA-OAEP decrypt on the token (hash and MGF1 hash both `hash_name`)."""

    @abc.abstractmethod
    def mac(self, data: bytes, purpose: str = "counter") -> bytes:
        """HMAC-SHA256 under a token-held secret for `purpose` ("counter" or "seal"), created
        on first use. Separate secrets: the counter's secret existing means "counter initialised"."""

    @abc.abstractmethod
    def has_mac_key(self, purpose: str = "counter") -> bool:
        """Whether the MAC secret for `purpose` exists on the token."""

    def close(self) -> None:  # pragma: no cover - default no-op
        pass


_LIB_LOCK = threading.Lock()


def _load_lib(module: str):
    """python-pkcs11 keeps one initialised lib per module path in the process."""
    import pkcs11
    from pkcs11.exceptions import PKCS11Error

    if not os.path.exists(module):
        raise TokenMissingError(
            f"PKCS#11 module {module} not found: install it or pass --pkcs11-module")
    with _LIB_LOCK:
        try:
            return pkcs11.lib(module)
        except PKCS11Error as e:
            raise TokenMissingError(f"cannot load PKCS#11 module {module}: {e}") from None


class Pkcs11Backend(TokenBackend):
    def __init__(self, config: TokenConfig):
        self.config = config
        self._session = None
        self._pem = None
        # Object handles found in this session. Keys are only ever added (never deleted or
        # relabelled by this code), so a found handle stays valid until the session closes;
        # measured: each C_FindObjects round costs ~0.2 ms, three per model load.
        self._handles: dict = {}

    # -- plumbing -------------------------------------------------------------------------
    def _open(self):
        if self._session is not None:
            return self._session
        from pkcs11 import exceptions as px

        lib = _load_lib(self.config.module)
        try:
            token = lib.get_token(token_label=self.config.token_label)
        except px.NoSuchToken:
            raise TokenMissingError(
                f"no PKCS#11 token labelled {self.config.token_label!r} in {self.config.module}: "
                "initialise it or pass --token-label") from None
        except px.MultipleTokensReturned:
            raise TokenError(f"several tokens labelled {self.config.token_label!r}: labels must be unique") from None
        pin = self.config.read_pin()
        try:
            self._session = token.open(rw=True, user_pin=pin)
        except px.PinLocked:
            raise TokenLockedError(f"token {self.config.token_label!r} is locked (too many wrong PINs): "
                                   "unlock it with the SO PIN") from None
        except (px.PinIncorrect, px.PinInvalid, px.PinLenRange):
            raise TokenLockedError(f"token {self.config.token_label!r} rejected the PIN: check the PIN file") from None
        except px.UserAlreadyLoggedIn:
            # PKCS#11 login state is per process and token: another session of ours is logged
            # in already, so a new session shares it.
            self._session = token.open(rw=True)
        except px.UserPinNotInitialized:
            raise TokenLockedError(f"token {self.config.token_label!r} has no user PIN: initialise the token") from None
        except (px.TokenNotPresent, px.DeviceRemoved):
            raise TokenMissingError(f"token {self.config.token_label!r} is not present") from None
        except px.PKCS11Error as e:
            raise TokenError(f"cannot open token {self.config.token_label!r}: {type(e).__name__} {e}") from None
        return self._session

    def close(self) -> None:
        self._handles.clear()
        if self._session is not None:
            try:
                self._session.close()
            finally:
                self._session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _find(self, object_class, label):
        from pkcs11 import exceptions as px

        hit = self._handles.get((object_class, label))
        if hit is not None:
            return hit
        s = self._open()
        try:
            key = s.get_key(object_class=object_class, label=label)
        except px.NoSuchKey:
            return None  # not cached: it may be created later (by us or another process)
        except px.MultipleObjectsReturned:
            raise TokenError(f"several objects labelled {label!r} on token {self.config.token_label!r}") from None
        self._handles[(object_class, label)] = key
        return key

    # -- device key -------------------------------------------------------------------------
    def ensure_device_key(self) -> bytes:
        from pkcs11 import Attribute, KeyType, ObjectClass

        if self._find(ObjectClass.PRIVATE_KEY, self.config.key_label) is None:
            s = self._open()
            # Generated on the token: the private half is sensitive and never extractable;
            # it may only decrypt (no sign/unwrap) so it cannot be used as an oracle elsewhere.
            s.generate_keypair(
                KeyType.RSA, 2048, label=self.config.key_label, id=self.config.key_label.encode(),
                store=True,
                public_template={Attribute.ENCRYPT: True, Attribute.VERIFY: False, Attribute.WRAP: False},
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.PRIVATE: True, Attribute.DECRYPT: True,
                                  Attribute.SIGN: False, Attribute.UNWRAP: False},
            )
        return self.public_key_pem()

    def public_key_pem(self) -> bytes:
        if getattr(self, "_pem", None) is None:
            self._pem = self._read_public_key_pem()
        return self._pem

    def _read_public_key_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from pkcs11 import Attribute, ObjectClass

        pub = self._find(ObjectClass.PUBLIC_KEY, self.config.key_label)
        if pub is None:
            raise TokenError(f"no device key {self.config.key_label!r} on token {self.config.token_label!r}: "
                             "run `appliance-agent store keygen`")
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def private_key_value(self, attribute_name: str = "PRIVATE_EXPONENT") -> bytes:
        """Try to read a private-key attribute. Exists so tests can show the token refuses."""
        from pkcs11 import Attribute, ObjectClass
        from pkcs11 import exceptions as px

        priv = self._find(ObjectClass.PRIVATE_KEY, self.config.key_label)
        if priv is None:
            raise TokenError("no device key")
        try:
            return priv[getattr(Attribute, attribute_name)]
        except (px.AttributeSensitive, px.AttributeTypeInvalid) as e:
            raise TokenError(f"token refused to reveal {attribute_name}: {type(e).__name__}") from None

    def decrypt_oaep(self, ciphertext: bytes, hash_name: str) -> bytes:
        from pkcs11 import MGF, Mechanism, ObjectClass
        from pkcs11 import exceptions as px

        table = {"SHA-1": (Mechanism.SHA_1, MGF.SHA1), "SHA-256": (Mechanism.SHA256, MGF.SHA256),
                 "SHA-384": (Mechanism.SHA384, MGF.SHA384), "SHA-512": (Mechanism.SHA512, MGF.SHA512)}
        if hash_name not in table:
            raise TokenError(f"unsupported OAEP hash {hash_name!r}")
        priv = self._find(ObjectClass.PRIVATE_KEY, self.config.key_label)
        if priv is None:
            raise TokenError(f"no device key {self.config.key_label!r} on token {self.config.token_label!r}: "
                             "run `appliance-agent store keygen`")
        try:
            return priv.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                                mechanism_param=(*table[hash_name], None))
        except (px.MechanismInvalid, px.MechanismParamInvalid, px.ArgumentsBad):
            raise TokenError(f"token {self.config.token_label!r} does not do RSA-OAEP with {hash_name}: "
                             "package for this token with --oaep-hash SHA-1") from None
        except (px.EncryptedDataInvalid, px.EncryptedDataLenRange, px.GeneralError, px.DataInvalid):
            # SoftHSM reports a bad OAEP block as a general error: treat both as tampering.
            raise IntegrityError("wrapped data key failed RSA-OAEP decryption on the token "
                                 "(tampered package or encrypted for another device)") from None

    # -- counter MAC --------------------------------------------------------------------------
    def _mac_label(self, purpose: str) -> str:
        if purpose not in ("counter", "seal"):
            raise ValueError(purpose)
        return self.config.mac_label if purpose == "counter" else self.config.mac_label + "-seal"

    def has_mac_key(self, purpose: str = "counter") -> bool:
        from pkcs11 import ObjectClass

        return self._find(ObjectClass.SECRET_KEY, self._mac_label(purpose)) is not None

    def mac(self, data: bytes, purpose: str = "counter") -> bytes:
        from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

        label = self._mac_label(purpose)
        key = self._find(ObjectClass.SECRET_KEY, label)
        if key is None:
            key = self._open().generate_key(
                KeyType.GENERIC_SECRET, 256, label=label, store=True,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.SIGN: True, Attribute.VERIFY: True,
                          Attribute.ENCRYPT: False, Attribute.DECRYPT: False,
                          Attribute.WRAP: False, Attribute.UNWRAP: False})
        return key.sign(data, mechanism=Mechanism.SHA256_HMAC)


def backend_from_config(config: TokenConfig) -> TokenBackend:
    return Pkcs11Backend(config)
