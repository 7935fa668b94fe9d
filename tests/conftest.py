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


def _runtime_http(url, body=None, timeout=10):
    """(status, JSON body) of a runtime request; 4xx/5xx answers are returned, not raised."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _wait_served(base: str, name: str, version: str, timeout: float = 300) -> None:
    """Until the runtime at `base` reports model `name` ready at `version` (guests under TCG are
    slow to load: poll /readyz instead of sleeping a fixed time)."""
    import time
    import urllib.error

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            _, ready = _runtime_http(base + "/readyz")
            last = ready
            m = ready.get("models", ready).get(name, {}) if isinstance(ready, dict) else {}
            if m.get("ready") and m.get("version") == version:
                return
        except (urllib.error.URLError, ConnectionError, OSError, ValueError) as e:
            last = e
        time.sleep(3)
    pytest.fail(f"runtime never served {name} {version}: {last}")


@pytest.fixture
def wait_served():
    """e2e helper shared by the booted-image store and fleet tests: wait_served(base, name, version)."""
    return _wait_served


@pytest.fixture
def runtime_http():
    """runtime_http(url, body=None, timeout=10) -> (status, JSON body), for booted-image tests."""
    return _runtime_http
