"""Build the frozen `appliance-agent` bundle (cached stage) and run it for real.

The trixie bundle needs trixie's glibc (2.38+), this host is bookworm: it runs inside the
cached trixie chroot with the bundle bound at /opt/appliance (host network, so the test reaches
it on 127.0.0.1). The bookworm/tflite-runtime bundle runs directly on the host.
Cold: ~5 min per bundle (mmdebstrap + pip + PyInstaller); warm: seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from appliance.image import bundle
from appliance.runtime import tinymodels

pytestmark = pytest.mark.e2e


def _predict(port: int, x: np.ndarray) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/fc:predict",
                                 data=json.dumps({"inputs": x.tolist()}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait_port(port_file, proc, timeout=120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.1)
    raise AssertionError("agent did not start listening")


@pytest.mark.parametrize("suite,backend", [("trixie", "litert"), ("bookworm", "tflite_runtime")])
def test_amd64_bundle_serves_a_prediction(tmp_path, suite, backend):
    # A snapshot of the device sources: other work in this tree must not change the key
    # between the cold and the warm call below.
    src = tmp_path / "src"
    for pkg in bundle.DEVICE_PACKAGES:
        if (bundle.REPO / pkg).is_dir():
            shutil.copytree(bundle.REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    bdir = bundle.build_agent_bundle("amd64", suite, progress=print, source_root=src)
    exe = bdir / "appliance-agent"
    assert exe.is_file() and os.access(exe, os.X_OK)
    manifest = bundle.bundle_manifest(bdir)
    assert manifest["backend"] == backend and manifest["arch"] == "amd64"
    # Warm call: the cache answers without rebuilding.
    t0 = time.monotonic()
    assert bundle.build_agent_bundle("amd64", suite, source_root=src) == bdir
    assert time.monotonic() - t0 < 10

    # The frozen archive holds the device packages and never host code or host-only libraries.
    mods = set(bundle.bundle_modules(bdir, "amd64", suite))
    assert {"appliance.runtime.server", "appliance.runtime.cli", "appliance.runtime.agent",
            bundle.BACKEND_MODULE[backend]} <= mods
    assert "appliance.secure.agent" in mods and any(m.startswith("appliance.power.") for m in mods)
    leaked = sorted(m for m in mods if m.split(".")[0] in ("jinja2", "pydantic", "fabric", "matplotlib", "tflite")
                    or m.startswith(("appliance.image", "appliance.provision")))
    assert not leaked, f"host code in the bundle: {leaked[:10]}"

    models, run = tmp_path / "models", tmp_path / "run"
    models.mkdir()
    run.mkdir()
    m = tinymodels.fully_connected_int8(12, 5, seed=9)
    (models / "fc.tflite").write_bytes(m)
    serve = ["runtime", "serve", "--model-dir", "/data/models", "--port", "0",
             "--port-file", "/run-test/port", "--board-json", "/nonexistent", "--reload-interval-s", "0"]
    if suite == "trixie":
        root, _ = bundle.build_chroot(bundle.plan_bundle("amd64", suite))
        argv = bundle.chroot_command(root, ["/opt/appliance/appliance-agent", *serve],
                                     {"/opt/appliance": bdir, "/data/models": models, "/run-test": run})
    else:  # bookworm bundle on the bookworm host, same paths through arguments
        serve = [a.replace("/data/models", str(models)).replace("/run-test", str(run)) for a in serve]
        argv = [str(exe), *serve]
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        port = _wait_port(run / "port", p)
        x = np.random.default_rng(3).integers(-128, 128, (4, 12)).astype(np.int8)
        doc = _predict(port, x)
        y = np.array(doc["outputs"][0], np.int64)
        assert np.abs(y - tinymodels.reference_output(m, x).astype(np.int64)).max() <= 1
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        err = p.stderr.read()
        assert "Traceback" not in err and "serving 1 model(s)" in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
