"""Error types of the secure model store.

Every refusal has its own class so callers (the runtime, provisioning) can tell them apart,
and every message is one line naming the thing at fault and what to do.
"""


class SecureError(Exception):
    """Base class: str(err) is a one-line reason fit for `prog: error: ...`."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class FormatError(SecureError):
    """A package, header, manifest or counter file is malformed (parser refusal)."""


class SignatureError(SecureError):
    """The vendor signature over the manifest does not verify."""


class RollbackError(SecureError):
    """The version is lower than the highest version accepted for that name."""


class BoardMismatchError(SecureError):
    """The manifest does not list this device's board."""


class IntegrityError(SecureError):
    """AES-GCM authentication failed or the plaintext hash does not match the manifest."""


class WrongDeviceError(SecureError):
    """The package's data key was encrypted for another device key."""


class TokenMissingError(SecureError):
    """The PKCS#11 module or token is absent."""


class TokenLockedError(SecureError):
    """The token refused the PIN (wrong PIN, PIN locked or not initialised)."""


class TokenError(SecureError):
    """Any other token failure (key missing, mechanism refused...)."""


class CounterError(SecureError):
    """The anti-rollback counter state is missing, forged or unreadable."""


class StoreError(SecureError):
    """Store-level failure (model not installed, I/O problem)."""
