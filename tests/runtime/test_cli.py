"""The daemon as a process: config errors, sd_notify, CPU affinity, SIGTERM; the agent dispatch;
device code never importing host code."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from appliance.runtime import tinymodels
from appliance.runtime.config import ConfigError, from_mapping, load_file
from appliance.runtime.loader import DirectorySource, ModelLoadError

PY = sys.executable
AGENT = [PY, "-m", "appliance.runtime.agent"]


def agent(*args, **kw):
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=60, **kw)


# ---- config validation (pure) ----

@pytest.mark.parametrize("raw,needle", [
    ({"port": 70000}, "port"),
    ({"port": "80"}, "port"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"defaults": {"max_batch": 0}}, "defaults.max_batch"),
    ({"defaults": {"max_batch": 2.5}}, "defaults.max_batch"),
    ({"defaults": {"colour": 1}}, "defaults.colour: unknown setting"),
    ({"models": {"fc": {"queue_size": -1}}}, "models.fc.queue_size"),
    ({"max_body_bytes": 10}, "max_body_bytes"),
    ({"defaults": {"batching": "sometimes"}}, "defaults.batching"),
    ({"defaults": {"batching": 1}}, "defaults.batching"),
    ({"defaults": {"inline_when_idle": "no"}}, "defaults.inline_when_idle: expected true or false"),
    ({"models": {"fc": {"inline_when_idle": 0}}}, "models.fc.inline_when_idle"),
])
def test_config_errors_name_the_field(raw, needle):
    with pytest.raises(ConfigError) as e:
        from_mapping(raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_file_per_model_overrides(tmp_path):
    f = tmp_path / "rt.toml"
    f.write_text('port = 9000\n[defaults]\nmax_batch = 4\n[models.fc]\nmax_wait_ms = 7.5\n')
    cfg = from_mapping(load_file(f))
    assert cfg.port == 9000 and cfg.defaults.max_batch == 4
    assert cfg.settings_for("fc").max_wait_ms == 7.5 and cfg.settings_for("fc").max_batch == 4
    assert cfg.settings_for("other").max_wait_ms == cfg.defaults.max_wait_ms


def test_inline_when_idle_from_file_and_flag(tmp_path):
    f = tmp_path / "rt.toml"
    f.write_text('[defaults]\ninline_when_idle = false\n[models.fc]\ninline_when_idle = true\n')
    cfg = from_mapping(load_file(f))
    assert cfg.defaults.inline_when_idle is False and cfg.settings_for("fc").inline_when_idle is True
    from appliance.runtime.cli import _parser, build_config
    assert build_config(_parser().parse_args(["serve"])).defaults.inline_when_idle is True
    assert build_config(_parser().parse_args(["serve", "--no-inline"])).defaults.inline_when_idle is False


def test_directory_source(tmp_path):
    (tmp_path / "a.tflite").write_bytes(b"x1")
    (tmp_path / "b.txt").write_bytes(b"x")
    (tmp_path / "bad name.tflite").write_bytes(b"x")
    src = DirectorySource(tmp_path)
    assert src.names() == ["a"]
    v1 = src.load("a").version
    (tmp_path / "a.tflite").write_bytes(b"x2")
    assert src.load("a").version != v1 and src.load("a").content == b"x2"
    with pytest.raises(ModelLoadError, match="no such file"):
        src.load("zzz")
    with pytest.raises(ModelLoadError, match="invalid model name"):
        src.load("../etc/passwd")


# ---- CLI errors: one line, no traceback ----

@pytest.mark.parametrize("args,needle", [
    (["--model-dir", "/nonexistent/models"], "model_dir /nonexistent/models: not a directory"),
    (["--max-batch", "0"], "defaults.max_batch"),
    (["--config", "/nonexistent.toml"], "/nonexistent.toml"),
])
def test_serve_config_errors_are_one_line(tmp_path, args, needle):
    base = ["--model-dir", str(tmp_path)] if "--model-dir" not in args else []
    r = agent("runtime", "serve", *base, *args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("appliance-agent runtime: error:")


def test_serve_bad_toml_is_one_line(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("port = = 3\n")
    r = agent("runtime", "serve", "--config", str(f), "--model-dir", str(tmp_path))
    assert r.returncode == 2 and f"{f}: not valid TOML" in r.stderr and "Traceback" not in r.stderr


def test_agent_dispatch_errors():
    r = agent("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
    r = agent()
    assert r.returncode == 2 and "usage:" in r.stderr
    r = agent("--help")
    assert r.returncode == 0 and "runtime" in r.stdout and "store" in r.stdout


def test_agent_dispatches_store_to_secure_agent():
    # Lazily imported appliance.secure.agent:main handles `store --help`.
    r = agent("store", "--help")
    assert "Traceback" not in r.stderr
    assert r.returncode == 0 and "store" in (r.stdout + r.stderr).lower()


# ---- a real daemon process ----

def _notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(20)
    return s, path


def _get(url, **kw):
    with urllib.request.urlopen(url, timeout=10, **kw) as r:
        return r.status, r.read()


def test_daemon_notify_watchdog_affinity_sigterm(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    m = tinymodels.fully_connected_f32(8, 2, seed=4)
    (models / "fc.tflite").write_bytes(m)
    cpus = sorted(os.sched_getaffinity(0))
    board = tmp_path / "board.json"
    board.write_text(json.dumps({"name": "test", "cpu": {"big": [cpus[-1]], "cores": len(cpus)}}))
    sock, path = _notify_socket(tmp_path)
    port_file = tmp_path / "port"
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    p = subprocess.Popen([*AGENT, "runtime", "serve", "--model-dir", str(models), "--port", "0",
                          "--port-file", str(port_file), "--board-json", str(board)],
                         env=env, stderr=subprocess.PIPE, text=True)
    try:
        msgs = []
        while not any("READY=1" in x for x in msgs):
            msgs.append(sock.recv(4096).decode())
        assert any("STATUS=serving 1 model(s)" in x for x in msgs)
        port = int(port_file.read_text())
        # Watchdog pings keep coming at WATCHDOG_USEC/2.
        pings = 0
        deadline = time.monotonic() + 5
        while pings < 3 and time.monotonic() < deadline:
            pings += sock.recv(4096).decode().count("WATCHDOG=1")
        assert pings >= 3
        # Pinned to the board's big core.
        status = Path(f"/proc/{p.pid}/status").read_text()
        allowed = next(l for l in status.splitlines() if l.startswith("Cpus_allowed_list"))
        assert allowed.split()[-1] == str(cpus[-1])
        # A request in flight when SIGTERM arrives still completes.
        x = np.ones((1, 8), np.float32)
        result = {}

        def slow_client():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/fc:predict",
                                         data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
            result["r"] = _get(req)

        status, _ = _get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200
        t = threading.Thread(target=slow_client)
        t.start()
        t.join(10)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(20)
        assert rc == 0
        assert result["r"][0] == 200
        y = np.array(json.loads(result["r"][1])["outputs"][0], np.float32)
        np.testing.assert_allclose(y, tinymodels.reference_output(m, x), rtol=1e-5)
        rest = []
        sock.settimeout(1)
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert any("STOPPING=1" in x for x in rest)
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        sock.close()


def test_port_in_use_is_one_line(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        r = agent("runtime", "serve", "--model-dir", str(tmp_path), "--port", str(port),
                  "--board-json", "/nonexistent")
        assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr
    finally:
        s.close()


# ---- dependency direction ----

DEVICE_MODULES = [
    "appliance.runtime.agent", "appliance.runtime.cli", "appliance.runtime.server",
    "appliance.runtime.engine", "appliance.runtime.loader", "appliance.runtime.config",
]


def _device_modules() -> list[str]:
    repo = Path(__file__).resolve().parents[2]
    mods = list(DEVICE_MODULES)
    for pkg in ("power", "secure"):
        for f in sorted((repo / pkg).glob("*.py")):
            if f.stem != "__init__":
                mods.append(f"appliance.{pkg}.{f.stem}")
    return mods


def test_device_code_never_imports_host_code():
    mods = _device_modules()
    code = (
        "import importlib, sys, json\n"
        f"mods = {mods!r}\n"
        "failed = {}\n"
        "for m in mods:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        failed[m] = repr(e)\n"
        "host = sorted(k for k in sys.modules if k.startswith(('appliance.image', 'appliance.provision')))\n"
        "print(json.dumps({'host': host, 'failed': failed}))\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["host"] == [], f"device code imported host modules: {doc['host']}"
    assert "appliance.runtime.agent" not in doc["failed"]
    assert len(mods) > len(DEVICE_MODULES)  # power/secure modules were really checked


def test_import_check_would_catch_a_host_import(tmp_path):
    # The check above must be able to fail: a module importing appliance.image shows up.
    code = ("import sys, appliance.image.cache\n"
            "print([k for k in sys.modules if k.startswith('appliance.image')])")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert "appliance.image" in r.stdout


def test_sighup_reloads_models(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "fc.tflite").write_bytes(tinymodels.fully_connected_f32(8, 2, seed=1))
    port_file = tmp_path / "port"
    p = subprocess.Popen([*AGENT, "runtime", "serve", "--model-dir", str(models), "--port", "0",
                          "--port-file", str(port_file), "--board-json", "/nonexistent",
                          "--reload-interval-s", "0"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        port = int(port_file.read_text())

        def models_doc():
            return json.loads(_get(f"http://127.0.0.1:{port}/v1/models")[1])["models"]

        v1 = models_doc()[0]["version"]
        (models / "fc.tflite").write_bytes(tinymodels.fully_connected_f32(8, 2, seed=2))
        (models / "extra.tflite").write_bytes(tinymodels.fully_connected_int8(4, 2))
        time.sleep(0.3)
        assert models_doc()[0]["version"] == v1  # no polling: nothing changes until SIGHUP
        p.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            doc = {m["name"]: m["version"] for m in models_doc()}
            if doc.get("fc") != v1 and "extra" in doc:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"SIGHUP did not reload: {doc}")
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
