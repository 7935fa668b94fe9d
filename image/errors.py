"""The one error type the image tools raise for user-facing problems."""


class BuildError(Exception):
    """A problem the user can act on; the CLI prints it as one line and exits non-zero."""
