"""Real .tflite models for the secure-store benchmarks, taken from the `mediapipe` 0.10.14 wheel
(fetched once, never installed: see wheel_models.package_dir)."""
from __future__ import annotations

from pathlib import Path

from wheel_models import package_dir

WHEEL = "mediapipe==0.10.14"
HAND = "mediapipe/modules/hand_landmark/hand_landmark_full.tflite"


def mediapipe_model(member: str = HAND) -> Path:
    return package_dir("mediapipe", WHEEL).parent / member
