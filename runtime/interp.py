"""The one place that imports a TFLite interpreter.

``ai-edge-litert`` (CPython 3.10-3.13, numpy 2) is preferred; ``tflite-runtime`` (2.14, the
last release, CPython <= 3.11, numpy < 2) is the fallback, which a bookworm builder freezes
because it is 9x smaller on disk. Both expose the same ``Interpreter`` class API.
``APPLIANCE_TFLITE_BACKEND`` = ``litert`` | ``tflite_runtime`` forces one (tests, benchmarks).
"""
from __future__ import annotations

import importlib
import os

BACKENDS = {
    "litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
}


class BackendError(RuntimeError):
    pass


def backend_order() -> list[str]:
    forced = os.environ.get("APPLIANCE_TFLITE_BACKEND", "").strip()
    if forced:
        if forced not in BACKENDS:
            raise BackendError(
                f"APPLIANCE_TFLITE_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}")
        return [forced]
    return list(BACKENDS)


def load_interpreter_module():
    """Return (backend name, interpreter module)."""
    errors = []
    for name in backend_order():
        try:
            return name, importlib.import_module(BACKENDS[name])
        except ImportError as e:
            errors.append(f"{BACKENDS[name]}: {e}")
    raise BackendError("no TFLite interpreter importable (install ai-edge-litert or tflite-runtime): "
                       + "; ".join(errors))


def load_interpreter_class():
    return load_interpreter_module()[1].Interpreter
