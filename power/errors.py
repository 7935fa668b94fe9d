"""The power area's one error type: str() is a one-line message fit for `prog: error: ...`."""


class PowerError(Exception):
    pass
