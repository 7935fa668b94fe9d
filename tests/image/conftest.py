"""Builds shared by the image e2e tests: one build per board per test session, reusing the
user's stage cache (a cold arm64 rootfs is ~10 minutes under qemu-user, the arm64 agent
bundle ~20; warm builds take seconds)."""
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = dict(in_features=16, out_features=4, batch=1, seed=7)


@pytest.fixture(scope="session")
def qemu_arm64_debug(tmp_path_factory):
    """qemu-arm64, debug profile, with the agent and a tiny model as factory data."""
    from appliance.image.build import build
    from appliance.image.config import make_config
    from appliance.runtime.tinymodels import fully_connected_f32

    out = tmp_path_factory.mktemp("qemu-arm64-debug")
    data = out / "data-tree"
    (data / "models").mkdir(parents=True)
    (data / "models" / "tiny.tflite").write_bytes(fully_connected_f32(**TINY))
    cfg = make_config("qemu-arm64", profile="debug", out_dir=out / "out", boards_dir=REPO / "boards",
                      data_tree=data)
    return cfg, build(cfg)


@pytest.fixture
def tiny_model_io():
    from appliance.runtime.tinymodels import fully_connected_f32, reference_output

    model = fully_connected_f32(**TINY)
    x = np.linspace(-1, 1, TINY["in_features"], dtype=np.float32).reshape(1, -1)
    return x, reference_output(model, x)
