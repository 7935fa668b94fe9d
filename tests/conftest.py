"""Fixtures shared across areas. The qemu-arm64 debug image is built once per test session
and reused by the image, agent and provisioning e2e tests (stages come from the user's cache:
a cold arm64 rootfs is ~10 minutes under qemu-user, the arm64 agent bundle ~10-20; a warm
build takes seconds)."""
import pathlib
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = dict(in_features=16, out_features=4, batch=1, seed=7)


@pytest.fixture(scope="session", autouse=True)
def _own_config_dir(tmp_path_factory):
    """Builds made by tests create their signing key in a temp config dir, not in ~/.config."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def ssh_ca(tmp_path_factory):
    """The session's factory SSH user CA (ed25519), baked into the qemu-arm64 images with
    --ssh-ca: .key (private, signs test certificates), .pub (public line file)."""
    d = tmp_path_factory.mktemp("ssh-ca")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test-factory-ca", "-f", str(d / "ca")],
                   check=True)
    return SimpleNamespace(key=d / "ca", pub=d / "ca.pub")


def _qemu_arm64(tmp_path_factory, profile: str, ssh_ca):
    from appliance.image.build import build
    from appliance.image.config import make_config
    from appliance.runtime.tinymodels import fully_connected_f32

    out = tmp_path_factory.mktemp(f"qemu-arm64-{profile}")
    data = out / "data-tree"
    (data / "models").mkdir(parents=True)
    (data / "models" / "tiny.tflite").write_bytes(fully_connected_f32(**TINY))
    cfg = make_config("qemu-arm64", profile=profile, out_dir=out / "out", boards_dir=REPO / "boards",
                      data_tree=data, ssh_ca=ssh_ca.pub)
    return cfg, build(cfg)


@pytest.fixture(scope="session")
def qemu_arm64_debug(tmp_path_factory, ssh_ca):
    """qemu-arm64, debug profile, with the agent, a tiny model as factory data and the session's
    SSH CA (fixture ssh_ca): (cfg, BuildResult)."""
    return _qemu_arm64(tmp_path_factory, "debug", ssh_ca)


@pytest.fixture(scope="session")
def qemu_arm64_production(tmp_path_factory, ssh_ca):
    """The same, production profile: no console shell, so reach it over SSH with a certificate
    from ssh_ca. Shares every cached stage with qemu_arm64_debug (a build costs ~20 s)."""
    return _qemu_arm64(tmp_path_factory, "production", ssh_ca)


@pytest.fixture
def tiny_model_io():
    """(input, numpy reference output) for the tiny model baked into qemu_arm64_debug."""
    from appliance.runtime.tinymodels import fully_connected_f32, reference_output

    model = fully_connected_f32(**TINY)
    x = np.linspace(-1, 1, TINY["in_features"], dtype=np.float32).reshape(1, -1)
    return x, reference_output(model, x)
