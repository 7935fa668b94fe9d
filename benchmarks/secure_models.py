"""Real .tflite models for the secure-store benchmarks, taken from the `mediapipe` 0.10.14 wheel.

The wheel (35 MB) is fetched with `pip download` (never installed: mediapipe is huge and not a
project dependency) into a cache directory, and only the requested model is unzipped from it.
Cache: $APPLIANCE_BENCH_CACHE, else ~/.cache/appliance-bench.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "mediapipe==0.10.14"
HAND = "mediapipe/modules/hand_landmark/hand_landmark_full.tflite"


def cache_dir() -> Path:
    d = Path(os.environ.get("APPLIANCE_BENCH_CACHE") or Path.home() / ".cache" / "appliance-bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


def mediapipe_model(member: str = HAND) -> Path:
    out = cache_dir() / Path(member).name
    if out.exists():
        return out
    wheels = sorted(cache_dir().glob("mediapipe-0.10.14-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL,
                        "-d", str(cache_dir())], check=True, stdout=subprocess.DEVNULL)
        wheels = sorted(cache_dir().glob("mediapipe-0.10.14-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        data = z.read(member)
    tmp = out.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out
