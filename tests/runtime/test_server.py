"""The daemon in-process on 127.0.0.1 with the real ai-edge-litert interpreter."""
from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest

from appliance.runtime import tinymodels
from rt_helpers import config, metric, serving

F32 = tinymodels.fully_connected_f32(16, 4, seed=1)
I8 = tinymodels.fully_connected_int8(16, 4, seed=2)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "fc.tflite").write_bytes(F32)
    (tmp_path / "q8.tflite").write_bytes(I8)
    return tmp_path


def run(coro):
    return asyncio.run(coro)


def test_predict_json_and_raw_match_numpy(model_dir):
    async def t():
        async with serving(config(model_dir)) as (_srv, s):
            x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
            r = await s.post("/v1/models/fc:predict", json={"inputs": x.tolist()})
            assert r.status == 200, await r.text()
            body = await r.json()
            np.testing.assert_allclose(np.array(body["outputs"][0], np.float32),
                                       tinymodels.reference_output(F32, x), rtol=1e-5, atol=1e-5)
            assert body["shapes"] == [[3, 4]] and body["dtypes"] == ["float32"]

            r = await s.post("/v1/models/fc:predict", data=x.astype("<f4").tobytes(),
                             headers={"Content-Type": "application/octet-stream"})
            assert r.status == 200 and r.headers["X-Tensor-Shape"] == "3,4"
            y = np.frombuffer(await r.read(), "<f4").reshape(3, 4)
            np.testing.assert_allclose(y, tinymodels.reference_output(F32, x), rtol=1e-5, atol=1e-5)

            xq = np.random.default_rng(1).integers(-128, 128, (2, 16)).astype(np.int8)
            r = await s.post("/v1/models/q8:predict", data=xq.tobytes(),
                             headers={"Content-Type": "application/octet-stream", "X-Tensor-Shape": "2,16"})
            assert r.status == 200
            yq = np.frombuffer(await r.read(), np.int8).reshape(2, 4)
            assert np.abs(yq.astype(int) - tinymodels.reference_output(I8, xq).astype(int)).max() <= 1
    run(t())


def test_models_listing_and_health(model_dir):
    async def t():
        async with serving(config(model_dir)) as (_srv, s):
            models = {m["name"]: m for m in (await (await s.get("/v1/models")).json())["models"]}
            assert set(models) == {"fc", "q8"}
            assert models["q8"]["inputs"] == [{"name": "input", "shape": [-1, 16], "dtype": "int8"}]
            assert models["fc"]["outputs"][0]["shape"] == [-1, 4]
            assert (await s.get("/healthz")).status == 200
            r = await s.get("/readyz")
            assert r.status == 200 and (await r.json())["models"]["fc"]["ready"] is True
            assert (await s.get("/readyz/fc")).status == 200
            assert (await s.get("/readyz/nope")).status == 404
    run(t())


BAD_REQUESTS = [
    # (label, model, body, content type, extra headers, expected status)
    ("malformed JSON", "fc", b'{"inputs": [[1, 2', "application/json", {}, 400),
    ("JSON not an object", "fc", b"[1, 2, 3]", "application/json", {}, 400),
    ("missing inputs key", "fc", b'{"input": [[1]]}', "application/json", {}, 400),
    ("ragged array", "fc", json.dumps({"inputs": [[1.0] * 16, [1.0] * 15]}).encode(), "application/json", {}, 400),
    ("strings", "fc", json.dumps({"inputs": [["a"] * 16]}).encode(), "application/json", {}, 400),
    ("nulls", "fc", json.dumps({"inputs": [[None] * 16]}).encode(), "application/json", {}, 400),
    ("booleans", "fc", json.dumps({"inputs": [[True] * 16]}).encode(), "application/json", {}, 400),
    ("empty inputs", "fc", b'{"inputs": []}', "application/json", {}, 400),
    ("wrong feature count", "fc", json.dumps({"inputs": [[1.0] * 15]}).encode(), "application/json", {}, 400),
    ("missing batch dim", "fc", json.dumps({"inputs": [1.0] * 16}).encode(), "application/json", {}, 400),
    ("too many dims", "fc", json.dumps({"inputs": [[[1.0] * 16]]}).encode(), "application/json", {}, 400),
    ("too many rows", "fc", json.dumps({"inputs": [[1.0] * 16] * 9}).encode(), "application/json", {}, 400),
    ("float overflow", "fc", json.dumps({"inputs": [[1e300] * 16]}).encode(), "application/json", {}, 400),
    ("floats for int8", "q8", json.dumps({"inputs": [[0.5] * 16]}).encode(), "application/json", {}, 400),
    ("int8 out of range", "q8", json.dumps({"inputs": [[300] * 16]}).encode(), "application/json", {}, 400),
    ("raw size not whole float32", "fc", b"\0" * 63, "application/octet-stream", {}, 400),
    ("raw size not whole rows", "fc", b"\0" * 60, "application/octet-stream", {}, 400),
    ("raw empty", "fc", b"", "application/octet-stream", {}, 400),
    ("raw shape header mismatch", "fc", b"\0" * 64, "application/octet-stream", {"X-Tensor-Shape": "2,16"}, 400),
    ("raw shape header garbage", "fc", b"\0" * 64, "application/octet-stream", {"X-Tensor-Shape": "x,y"}, 400),
    ("raw wrong inner shape", "fc", b"\0" * 64, "application/octet-stream", {"X-Tensor-Shape": "2,8"}, 400),
    ("raw shape header overflowing int64", "fc", b"\0" * 64, "application/octet-stream",
     {"X-Tensor-Shape": "4294967296,4294967296,1"}, 400),
    ("JSON huge integers", "fc", b'{"inputs": [[' + b"1" * 40 + b"]]}", "application/json", {}, 400),
    ("unsupported content type", "fc", b"1,2,3", "text/csv", {}, 415),
    ("unknown model", "nope", b'{"inputs": [[1]]}', "application/json", {}, 404),
    ("model name with path chars", "..%2F..%2Fetc", b'{"inputs": [[1]]}', "application/json", {}, 404),
    ("oversized body", "fc", b"{" + b" " * (1 << 20) + b"}", "application/json", {}, 413),
]


@pytest.mark.parametrize("label,model,body,ctype,headers,status", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_table(model_dir, label, model, body, ctype, headers, status):
    async def t():
        async with serving(config(model_dir)) as (_srv, s):
            r = await s.post(f"/v1/models/{model}:predict", data=body,
                             headers={"Content-Type": ctype, **headers})
            assert r.status == status, (label, await r.text())
            doc = await r.json(content_type=None)
            assert isinstance(doc.get("error"), str) and doc["error"] and "\n" not in doc["error"]
            # The daemon still answers correctly afterwards.
            ok = await s.post("/v1/models/fc:predict", json={"inputs": [[0.5] * 16]})
            assert ok.status == 200
    run(t())


def test_wrong_method_and_path_are_json_4xx(model_dir):
    async def t():
        async with serving(config(model_dir)) as (_srv, s):
            r = await s.get("/v1/models/fc:predict")
            assert r.status == 405 and "error" in await r.json()
            r = await s.post("/v1/models/fc:classify", json={"inputs": [[1]]})
            assert r.status == 404 and "error" in await r.json()
    run(t())


def test_corrupt_model_not_served_others_are(model_dir):
    (model_dir / "broken.tflite").write_bytes(F32[: len(F32) // 2])   # truncated
    (model_dir / "junk.tflite").write_bytes(os.urandom(2000))

    async def t():
        async with serving(config(model_dir)) as (_srv, s):
            r = await s.get("/readyz")
            assert r.status == 503
            doc = await r.json()
            assert doc["models"]["fc"]["ready"] and doc["models"]["q8"]["ready"]
            for bad in ("broken", "junk"):
                assert doc["models"][bad]["ready"] is False and doc["models"][bad]["error"]
                r = await s.post(f"/v1/models/{bad}:predict", json={"inputs": [[1.0] * 16]})
                assert r.status == 404 and "not loaded" in (await r.json())["error"]
            assert (await s.get("/readyz/broken")).status == 503
            r = await s.post("/v1/models/fc:predict", json={"inputs": [[1.0] * 16]})
            assert r.status == 200
            names = [m["name"] for m in (await (await s.get("/v1/models")).json())["models"]]
            assert names == ["fc", "q8"]
    run(t())


def test_many_concurrent_clients_get_their_own_answers(model_dir):
    async def t():
        async with serving(config(model_dir, max_batch=8, max_wait_ms=2, queue_size=256, batching="on")) as (_srv, s):
            rng = np.random.default_rng(7)
            xs = [rng.standard_normal((1 + i % 3, 16)).astype(np.float32) for i in range(120)]

            async def one(x):
                r = await s.post("/v1/models/fc:predict", json={"inputs": x.tolist()})
                assert r.status == 200
                return np.array((await r.json())["outputs"][0], np.float32)

            ys = await asyncio.gather(*(one(x) for x in xs))
            for x, y in zip(xs, ys):
                np.testing.assert_allclose(y, tinymodels.reference_output(F32, x), rtol=1e-5, atol=1e-5)
    run(t())


def test_batching_merges_requests_visible_in_metrics(model_dir):
    async def t():
        async with serving(config(model_dir, max_batch=16, max_wait_ms=50, queue_size=256, batching="on")) as (_srv, s):
            xs = [np.full((1, 16), i, np.float32) for i in range(32)]
            rs = await asyncio.gather(*(s.post("/v1/models/fc:predict", json={"inputs": x.tolist()}) for x in xs))
            assert all(r.status == 200 for r in rs)
            text = await (await s.get("/metrics")).text()
            invokes = metric(text, "appliance_runtime_batch_rows_count", model="fc")
            rows = metric(text, "appliance_runtime_batch_rows_sum", model="fc")
            assert rows == 32
            assert invokes <= 8, f"32 single-row requests took {invokes} invokes: not batched"
            assert metric(text, "appliance_runtime_requests_total", model="fc", code="200") == 32
            p50 = metric(text, "appliance_runtime_request_latency_window_seconds", model="fc", quantile="0.5")
            p99 = metric(text, "appliance_runtime_request_latency_window_seconds", model="fc", quantile="0.99")
            assert 0 < p50 <= p99 < 60
    run(t())


def test_batching_off_with_max_batch_1(model_dir):
    async def t():
        async with serving(config(model_dir, max_batch=1, queue_size=256)) as (_srv, s):
            rs = await asyncio.gather(*(s.post("/v1/models/fc:predict", json={"inputs": [[1.0] * 16]})
                                        for _ in range(10)))
            assert all(r.status == 200 for r in rs)
            text = await (await s.get("/metrics")).text()
            assert metric(text, "appliance_runtime_batch_rows_count", model="fc") == 10
    run(t())


def test_overload_gives_429_then_recovers(tmp_path):
    # A model big enough that invokes take time, one interpreter, a queue of 2.
    (tmp_path / "big.tflite").write_bytes(tinymodels.fully_connected_f32(1024, 1024, seed=3))
    x = np.ones((1, 1024), np.float32)

    async def t():
        async with serving(config(tmp_path, max_batch=1, queue_size=2)) as (_srv, s):
            body = x.astype("<f4").tobytes()
            hdr = {"Content-Type": "application/octet-stream"}
            rs = await asyncio.gather(*(s.post("/v1/models/big:predict", data=body, headers=hdr)
                                        for _ in range(60)))
            codes = [r.status for r in rs]
            assert set(codes) <= {200, 429}
            assert codes.count(429) > 0 and codes.count(200) >= 2
            r429 = next(r for r in rs if r.status == 429)
            assert r429.headers["Retry-After"] == "1" and "queue full" in (await r429.json())["error"]
            # Recovers: sequential requests all succeed, with correct results.
            for _ in range(5):
                r = await s.post("/v1/models/big:predict", data=body, headers=hdr)
                assert r.status == 200
            text = await (await s.get("/metrics")).text()
            assert metric(text, "appliance_runtime_requests_total", model="big", code="429") == codes.count(429)
            assert metric(text, "appliance_runtime_queue_depth", model="big") == 0
    run(t())


def test_timeout_gives_504_and_daemon_continues(tmp_path):
    (tmp_path / "big.tflite").write_bytes(tinymodels.fully_connected_f32(1024, 2048, seed=4))

    async def t():
        async with serving(config(tmp_path, max_batch=1, queue_size=64, timeout_s=0.0005)) as (srv, s):
            body = np.ones((1, 1024), "<f4").tobytes()
            rs = await asyncio.gather(*(s.post("/v1/models/big:predict", data=body,
                                               headers={"Content-Type": "application/octet-stream"})
                                        for _ in range(20)))
            assert 504 in [r.status for r in rs]
            assert (await s.get("/healthz")).status == 200
    run(t())


def test_hot_reload_under_load_loses_no_request(tmp_path):
    old = tinymodels.fully_connected_f32(16, 4, seed=10)
    new = tinymodels.fully_connected_f32(16, 4, seed=11)
    (tmp_path / "m.tflite").write_bytes(old)
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    y_old, y_new = tinymodels.reference_output(old, x), tinymodels.reference_output(new, x)

    async def t():
        async with serving(config(tmp_path, max_batch=8, max_wait_ms=1, queue_size=512, batching="on")) as (srv, s):
            results, stop = [], asyncio.Event()

            async def client():
                while not stop.is_set():
                    r = await s.post("/v1/models/m:predict", json={"inputs": x.tolist()})
                    results.append((r.status, await r.json()))

            clients = [asyncio.create_task(client()) for _ in range(16)]
            await asyncio.sleep(0.3)
            tmp = tmp_path / "m.tflite.tmp"
            tmp.write_bytes(new)
            os.replace(tmp, tmp_path / "m.tflite")  # how an updater publishes a model
            await srv.registry.reload()
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*clients)
            statuses = [st for st, _ in results]
            assert statuses and set(statuses) == {200}, f"non-200 during reload: {set(statuses)}"
            versions = [d["version"] for _, d in results]
            assert len(set(versions)) == 2, "both versions should have answered"
            # Each answer is exactly the old or the new model's result, matching its version.
            first_new = versions.index(versions[-1])
            for st, d in results:
                y = np.array(d["outputs"][0], np.float32)
                want = y_new if d["version"] == versions[-1] else y_old
                np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
            assert first_new > 0
            text = await (await s.get("/metrics")).text()
            assert metric(text, "appliance_runtime_model_reloads_total", model="m") == 1
    run(t())


def test_reload_to_corrupt_version_keeps_serving_old(tmp_path):
    (tmp_path / "m.tflite").write_bytes(F32)

    async def t():
        async with serving(config(tmp_path)) as (srv, s):
            v1 = srv.registry.runners["m"].version
            (tmp_path / "m.tflite").write_bytes(b"TFL3" * 10)
            await srv.registry.reload()
            r = await s.post("/v1/models/m:predict", json={"inputs": [[1.0] * 16]})
            assert r.status == 200 and (await r.json())["version"] == v1
            doc = await (await s.get("/readyz")).json()
            assert "still serving" in doc["models"]["m"]["error"]
            (tmp_path / "m.tflite").unlink()
            await srv.registry.reload()
            r = await s.post("/v1/models/m:predict", json={"inputs": [[1.0] * 16]})
            assert r.status == 404
    run(t())


def test_fixed_batch_model_is_batched_by_resizing(tmp_path):
    fixed = tinymodels.fully_connected_f32(16, 4, seed=6, dynamic_batch=False)
    (tmp_path / "fixed.tflite").write_bytes(fixed)

    async def t():
        async with serving(config(tmp_path, max_batch=8, max_wait_ms=50, queue_size=64, batching="on")) as (_srv, s):
            info = (await (await s.get("/v1/models")).json())["models"][0]
            assert info["batching"]["enabled"] and info["inputs"][0]["shape"] == [-1, 16]
            xs = [np.full((1, 16), i / 10, np.float32) for i in range(8)]
            rs = await asyncio.gather(*(s.post("/v1/models/fixed:predict", json={"inputs": x.tolist()}) for x in xs))
            for x, r in zip(xs, rs):
                y = np.array((await r.json())["outputs"][0], np.float32)
                np.testing.assert_allclose(y, tinymodels.reference_output(fixed, x), rtol=1e-5, atol=1e-5)
            text = await (await s.get("/metrics")).text()
            assert metric(text, "appliance_runtime_batch_rows_count", model="fixed") < 8

    run(t())


def test_fixed_batch_model_unbatched_when_max_batch_1(tmp_path):
    (tmp_path / "fixed.tflite").write_bytes(tinymodels.fully_connected_f32(16, 4, dynamic_batch=False))

    async def t():
        async with serving(config(tmp_path, max_batch=1)) as (_srv, s):
            info = (await (await s.get("/v1/models")).json())["models"][0]
            assert not info["batching"]["enabled"] and info["inputs"][0]["shape"] == [1, 16]
            r = await s.post("/v1/models/fixed:predict", json={"inputs": [[1.0] * 16] * 2})
            assert r.status == 400
            r = await s.post("/v1/models/fixed:predict", json={"inputs": [[1.0] * 16]})
            assert r.status == 200
    run(t())


def test_batching_off_and_auto_are_reported(model_dir):
    async def t():
        async with serving(config(model_dir, max_batch=8, batching="off", max_wait_ms=50)) as (_srv, s):
            info = (await (await s.get("/v1/models")).json())["models"][0]
            assert info["batching"]["enabled"] is False and "off" in info["batching"]["reason"]
            # Multi-row requests are still accepted; requests are just not merged.
            rs = await asyncio.gather(*(s.post("/v1/models/fc:predict", json={"inputs": [[1.0] * 16] * 2})
                                        for _ in range(6)))
            assert all(r.status == 200 for r in rs)
            text = await (await s.get("/metrics")).text()
            assert metric(text, "appliance_runtime_batch_rows_count", model="fc") == 6
        async with serving(config(model_dir, max_batch=8)) as (_srv, s):
            info = (await (await s.get("/v1/models")).json())["models"][0]
            assert info["batching"]["mode"] == "auto" and "ms/row" in info["batching"]["reason"]
    run(t())


@pytest.mark.parametrize("t1,tb,b,merge", [(1.0, 1.2, 4, True), (1.0, 3.9, 4, False), (0.77e-3, 15.3e-3, 4, False),
                                          (20e-6, 30e-6, 4, True)])
def test_decide_merge(t1, tb, b, merge):
    from appliance.runtime.engine import decide_merge
    got, why = decide_merge(t1, tb, b)
    assert got is merge and "ms/row" in why


def test_latency_window_quantiles_are_exact():
    from prometheus_client import generate_latest

    from appliance.runtime.metrics import WINDOW, Metrics

    m = Metrics()
    for i in range(1, 101):
        m.window.observe("a", i / 1000)
    for _ in range(WINDOW):  # the window forgets: only the latest WINDOW count
        m.window.observe("b", 0.5)
    m.window.observe("b", 0.001)
    text = generate_latest(m.registry).decode()
    assert metric(text, "appliance_runtime_request_latency_window_seconds", model="a", quantile="0.5") == pytest.approx(0.0505)
    assert metric(text, "appliance_runtime_request_latency_window_seconds", model="a", quantile="0.99") == pytest.approx(0.09901)
    assert metric(text, "appliance_runtime_request_latency_window_seconds", model="b", quantile="0.5") == 0.5


def _timing(resp) -> dict:
    return {k: float(v) for k, v in
            (part.strip().split(";dur=") for part in resp.headers["Server-Timing"].split(","))}


def test_server_timing_header_splits_the_request(model_dir):
    async def t():
        async with serving(config(model_dir)) as (_srv, s):
            for kw in ({"json": {"inputs": [[1.0] * 16]}},
                       {"data": np.ones((1, 16), "<f4").tobytes(),
                        "headers": {"Content-Type": "application/octet-stream"}}):
                r = await s.post("/v1/models/fc:predict", **kw)
                assert r.status == 200
                st = _timing(r)
                assert set(st) == {"read", "queue", "invoke", "handler"}
                assert st["invoke"] > 0 and st["queue"] >= 0 and st["read"] >= 0
                assert st["handler"] >= st["invoke"] + st["queue"]
    run(t())


@pytest.mark.parametrize("inline", [True, False])
def test_lone_requests_run_inline_unless_disabled(model_dir, inline):
    # An idle daemon runs a request on the event loop thread (no thread hand-off); the
    # answers are the same either way.
    async def t():
        async with serving(config(model_dir, inline_when_idle=inline)) as (srv, s):
            x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
            for _ in range(5):
                r = await s.post("/v1/models/fc:predict", json={"inputs": x.tolist()})
                assert r.status == 200
                np.testing.assert_allclose(np.array((await r.json())["outputs"][0], np.float32),
                                           tinymodels.reference_output(F32, x), rtol=1e-5, atol=1e-5)
            text = await (await s.get("/metrics")).text()
            assert metric(text, "appliance_runtime_inline_invokes_total", model="fc") == (5 if inline else 0)
            threads = srv.registry.runners["fc"]._executor._threads  # noqa: SLF001
            assert (len(threads) == 0) is inline
    run(t())


def test_concurrent_requests_are_not_run_inline(tmp_path):
    # 32 requests in flight at once: at most the very first may run inline, the others must
    # be queued and batched, or the event loop would serialise the whole load.
    (tmp_path / "fc.tflite").write_bytes(F32)

    async def t():
        async with serving(config(tmp_path, max_batch=32, max_wait_ms=0, queue_size=256, batching="on")) as (_srv, s):
            body = np.ones((1, 16), "<f4").tobytes()
            hdr = {"Content-Type": "application/octet-stream"}
            rs = await asyncio.gather(*(s.post("/v1/models/fc:predict", data=body, headers=hdr) for _ in range(32)))
            assert all(r.status == 200 for r in rs)
            text = await (await s.get("/metrics")).text()
            assert metric(text, "appliance_runtime_inline_invokes_total", model="fc") <= 1
            assert metric(text, "appliance_runtime_batch_rows_count", model="fc") < 32
    run(t())


def test_cheap_unbatched_model_runs_inline_under_load_a_costly_one_does_not(tmp_path):
    from appliance.runtime import engine
    (tmp_path / "fc.tflite").write_bytes(F32)  # 16x4: a few microseconds per invoke

    async def load(s):
        body = np.ones((1, 16), "<f4").tobytes()
        hdr = {"Content-Type": "application/octet-stream"}
        r = await s.post("/v1/models/fc:predict", data=body, headers=hdr)  # measures the invoke
        assert r.status == 200
        rs = await asyncio.gather(*(s.post("/v1/models/fc:predict", data=body, headers=hdr) for _ in range(32)))
        assert all(r.status == 200 for r in rs)
        return metric(await (await s.get("/metrics")).text(), "appliance_runtime_inline_invokes_total", model="fc")

    async def t():
        # The threshold is set around the measured invoke (not left at 0.1 ms: a busy CI
        # machine can stretch one invoke past that), so this checks the rule, not the clock.
        for cheap_s, check in ((1.0, lambda n: n >= 30), (0.0, lambda n: n <= 2)):
            engine.CHEAP_INVOKE_S = cheap_s
            async with serving(config(tmp_path, max_batch=1, queue_size=256)) as (_srv, s):
                n = await load(s)
                assert check(n), f"threshold {cheap_s} s: {n} of 33 invokes inline"
            async with serving(config(tmp_path, max_batch=1, queue_size=256, inline_when_idle=False)) as (_srv, s):
                assert await load(s) == 0  # switched off means never

    old = engine.CHEAP_INVOKE_S
    try:
        run(t())
    finally:
        engine.CHEAP_INVOKE_S = old


def test_runner_max_wait_counts_from_arrival_and_a_full_batch_goes_at_once():
    from appliance.runtime.config import ModelSettings
    from appliance.runtime.engine import ModelRunner, Timing

    async def t():
        r = ModelRunner("fc", "1", F32, ModelSettings(max_batch=4, max_wait_ms=300, batching="on"))
        r.start()
        try:
            x = np.ones((1, 16), np.float32)
            # A lone request waits max_wait for company before it runs.
            tm = Timing()
            await r.predict(x, tm)
            assert tm.queue_s >= 0.29
            # Four rows fill a batch: dispatched at once, one invoke, nobody waits max_wait.
            tms = [Timing() for _ in range(4)]
            outs = await asyncio.gather(*(r.predict(x * i, tm) for i, tm in enumerate(tms)))
            for i, o in enumerate(outs):
                np.testing.assert_allclose(o[0], tinymodels.reference_output(F32, x * i), rtol=1e-5, atol=1e-5)
            assert all(tm.queue_s < 0.29 for tm in tms)
            assert len({tm.invoke_s for tm in tms}) == 1  # the same invoke
        finally:
            await r.close()
    run(t())


def test_runner_returns_only_the_outputs_asked_for():
    from appliance.runtime.config import ModelSettings
    from appliance.runtime.engine import ModelRunner

    async def t():
        r = ModelRunner("fc", "1", F32, ModelSettings())
        r.start()
        try:
            x = np.ones((2, 16), np.float32)
            full = await r.predict(x)
            assert len(full) == 1 and full[0].shape == (2, 4)
            assert await r.predict(x, outputs=()) == []
            (o0,) = await r.predict(x, outputs=(0,))
            np.testing.assert_array_equal(o0, full[0])
            o0[:] = 0  # a private copy: scribbling on it changes no later answer
            np.testing.assert_array_equal((await r.predict(x))[0], full[0])
        finally:
            await r.close()
    run(t())


def test_runner_close_waits_for_queued_requests_and_a_timed_out_one_is_dropped():
    from appliance.runtime.config import ModelSettings
    from appliance.runtime.engine import ModelRunner, RunnerClosed

    async def t():
        r = ModelRunner("fc", "1", F32, ModelSettings(max_batch=4, max_wait_ms=200, batching="on", timeout_s=0.05))
        r.start()
        x = np.ones((1, 16), np.float32)
        with pytest.raises(asyncio.TimeoutError):
            await r.predict(x)  # waits 200 ms for company, times out after 50 ms
        assert r.queue_depth() == 0  # dropped from the queue, never invoked
        r2 = ModelRunner("fc", "1", F32, ModelSettings(max_batch=4, max_wait_ms=100, batching="on"))
        r2.start()
        pending = [asyncio.ensure_future(r2.predict(x)) for _ in range(3)]
        await asyncio.sleep(0)
        assert r2.queue_depth() == 3
        await r2.close()  # drains: every queued request is answered before it returns
        assert r2.queue_depth() == 0 and r2._inflight == 0  # noqa: SLF001
        outs = await asyncio.wait_for(asyncio.gather(*pending), 5)
        for (o,) in outs:
            np.testing.assert_allclose(o, tinymodels.reference_output(F32, x), rtol=1e-5, atol=1e-5)
        with pytest.raises(RunnerClosed):
            await r2.predict(x)
        await r.close()
    run(t())


def test_every_pool_interpreter_is_warmed_up_at_load():
    """The first invoke prepares kernels (XNNPACK packs weights): it happens at load, for
    every interpreter of the pool, not in the first requests' latency."""
    from appliance.runtime.config import ModelSettings
    from appliance.runtime.engine import ModelRunner

    expect = tinymodels.reference_output(F32, np.zeros((1, 16), np.float32))
    assert np.abs(expect).max() > 0  # the bias: an interpreter never invoked holds no such output
    r = ModelRunner("fc", "1", F32, ModelSettings(pool_size=2, max_batch=1))
    slots = [next(iter(slot.values())) for slot in r._free]
    assert len(slots) == 2
    for it in slots:
        got = it.get_tensor(it.get_output_details()[0]["index"])
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    assert r.load_seconds > 0
