"""Builds shared by the image e2e tests: one build per board per test session, reusing the
user's stage cache (a cold arm64 rootfs is ~12 minutes under qemu-user; warm builds take seconds)."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def qemu_arm64_debug(tmp_path_factory):
    from appliance.image.build import build
    from appliance.image.config import make_config

    out = tmp_path_factory.mktemp("qemu-arm64-debug")
    cfg = make_config("qemu-arm64", profile="debug", out_dir=out, boards_dir=REPO / "boards")
    return cfg, build(cfg)
