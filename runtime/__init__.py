"""appliance.runtime: the on-device TFLite inference daemon and the `appliance-agent` entry point.

Modules: agent (multi-call dispatch), cli (`runtime serve`), config (validated dataclasses),
server (aiohttp app, model registry, hot reload, lifecycle), engine (interpreter pools and the
dynamic batcher), loader (model sources: plain directory; the secure store plugs in with the
same names()/load() interface), interp (the one TFLite import), metrics, sdnotify, and
tinymodels (tiny .tflite models for tests, built without TensorFlow).
Device code: never imports appliance.image or appliance.provision.
"""
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
