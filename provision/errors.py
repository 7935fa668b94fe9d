"""The one error type every provisioning command raises for a user-facing failure.

Its str() is a single line naming the file/device/field and what to do; cli.main() prints
it as ``provision: error: ...`` and exits non-zero, so no traceback ever reaches a user.
"""


class ProvisionError(Exception):
    """A failure the user can act on; str() is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
