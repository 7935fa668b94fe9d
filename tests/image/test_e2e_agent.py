"""e2e: the frozen appliance-agent in the booted qemu-arm64 image serves a prediction over a
forwarded port, and the power manager runs (observe-only: QEMU has no cpufreq)."""
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from appliance.image.boot import READY_MARKER, start

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]


def _http(url, body=None, timeout=10):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def test_runtime_serves_baked_model_and_power_observes(qemu_arm64_debug, tiny_model_io, tmp_path):
    cfg, res = qemu_arm64_debug
    assert res.manifest_data["agent"]["arch"] == "arm64"
    x, want = tiny_model_io
    with start(res.image, board=cfg.board, forwards=[8500], log_path=tmp_path / "console.log") as vm:
        vm.expect(READY_MARKER, 900)
        base = f"http://127.0.0.1:{vm.forwards[8500]}"
        deadline, last = time.monotonic() + 300, None
        while time.monotonic() < deadline:   # the runtime may still be loading under TCG
            try:
                status, ready = _http(base + "/readyz")
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last = e
            time.sleep(3)
        else:
            pytest.fail(f"runtime never ready: {last}")
        status, out = _http(base + "/v1/models/tiny:predict", json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200
        np.testing.assert_allclose(np.asarray(out["outputs"][0], dtype=np.float32), want, rtol=1e-5, atol=1e-5)
        vm.send("\n")
        vm.expect(r"root@qemu-arm64:[^\n]*# ", 120)
        rc, out = vm.run("systemctl is-active appliance-runtime appliance-power")
        assert out.split() == ["active", "active"], out
        # The power unit is Type=simple and starts after the runtime is ready: under TCG the frozen
        # agent can take tens of seconds to import, so wait for its first log line before judging it.
        deadline = time.monotonic() + 180
        while True:
            rc, out = vm.run("journalctl -b -u appliance-power --no-pager -q | grep -c observe-only")
            if int(out.strip() or 0) >= 1:
                break
            if time.monotonic() > deadline:
                _, log = vm.run("journalctl -b -u appliance-power --no-pager -q")
                pytest.fail(f"power manager never logged observe-only mode: {log}")
            time.sleep(5)
        rc, out = vm.run("journalctl -b -u appliance-power -p warning --no-pager -q")
        assert out.strip() == "", f"power manager logged warnings/errors: {out}"
