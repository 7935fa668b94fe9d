#!/usr/bin/env python3
"""Runtime benchmark (host, x86): latency, batching throughput, bundle size and cold start.

    .venv/bin/python benchmarks/runtime_latency.py [--quick] [--skip-bundle]

Real models come from the `mediapipe` 0.10.14 wheel (PyPI), downloaded once with
`pip download` into $APPLIANCE_CACHE_DIR/bench (never installed, not a project dependency)
and unzipped there.

1. p50/p99 latency through the HTTP API (raw little-endian body, one sequential client,
   daemon as a subprocess with 1 interpreter, num_threads=1, max_wait_ms=0) / raw
   Interpreter.invoke() in the same run, strictly alternating so both see the same noise.
   Target: <= 1.05 at p50 for a model of >= 1 ms invoke.
2. Throughput at 32 concurrent clients, batching (max_batch=32, max_wait_ms=0: a batch is
   whatever queued while the interpreter was busy) / no batching (max_batch=1), alternating
   rounds. Target >= 2.
3. Bundle size on disk and cold start to first prediction, bundle vs plain python.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from appliance.image import cache  # noqa: E402  (host-side benchmark: may use host code)
from appliance.runtime import tinymodels  # noqa: E402
from appliance.runtime.interp import load_interpreter_class  # noqa: E402

MEDIAPIPE = "mediapipe==0.10.14"
LATENCY_MODELS = ("hand_landmark/hand_landmark_lite",   # ~3-6 ms invoke here, 602 KB input
                  "pose_landmark/pose_landmark_full")   # ~50 ms invoke, 786 KB input
THROUGHPUT_MODEL = "face_landmark/face_landmark"        # ~0.8 ms invoke, batchable by resize


def mediapipe_models() -> Path:
    d = cache.cache_root() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    out = d / "mp"
    if not list(out.glob("**/*.tflite")):
        wheels = glob.glob(str(d / "mediapipe-0.10.14-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            MEDIAPIPE, "-d", str(d)], check=True)
            wheels = glob.glob(str(d / "mediapipe-0.10.14-*.whl"))
        with zipfile.ZipFile(wheels[0]) as z:
            for n in z.namelist():
                if n.endswith(".tflite"):
                    z.extract(n, out)
    return out / "mediapipe" / "modules"


def pct(xs, p):
    return float(np.percentile(np.asarray(xs), p))


class Daemon:
    def __init__(self, argv_prefix, model_dir: Path, *extra: str, env=None):
        """argv_prefix: a list (the agent command) or a function args -> full argv."""
        self.run = Path(tempfile.mkdtemp(prefix="rt-bench-"))
        self.port_file = self.run / "port"
        wrap = argv_prefix if callable(argv_prefix) else (lambda args: [*argv_prefix, *args])
        self.p = subprocess.Popen(wrap(["runtime", "serve", "--model-dir", str(model_dir), "--port", "0",
                                   "--port-file", str(self.port_file), "--board-json", "/nonexistent",
                                   "--reload-interval-s", "0", "--log-level", "WARNING", *extra]),
                                  stderr=subprocess.DEVNULL, env=env)
        while not self.port_file.exists():
            if self.p.poll() is not None:
                raise SystemExit(f"daemon exited {self.p.returncode}: {argv_prefix}")
            time.sleep(0.002)
        self.port = int(self.port_file.read_text())

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(30)


def raw_post(conn: http.client.HTTPConnection, name: str, body: bytes) -> bytes:
    conn.request("POST", f"/v1/models/{name}:predict", body=body,
                 headers={"Content-Type": "application/octet-stream"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {data[:200]!r}")
    return data


def bench_latency(model_path: Path, rounds: int, per_round: int) -> dict:
    content = model_path.read_bytes()
    Interpreter = load_interpreter_class()
    it = Interpreter(model_content=content, num_threads=1)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    x = np.random.default_rng(0).random(d["shape"], dtype=np.float32)
    it.set_tensor(d["index"], x)
    mdir = Path(tempfile.mkdtemp(prefix="rt-bench-m-"))
    (mdir / "m.tflite").write_bytes(content)
    daemon = Daemon([sys.executable, "-m", "appliance.runtime.agent"], mdir,
                    "--pool-size", "1", "--num-threads", "1", "--max-wait-ms", "0", "--no-affinity")
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port)
    body = x.astype("<f4").tobytes()
    for _ in range(10):
        it.invoke()
        raw_post(conn, "m", body)
    raw, web = [], []
    # Strictly alternating raw / HTTP, so both see the same machine load (2 shared cores).
    for _ in range(rounds * per_round):
        t = time.perf_counter()
        it.invoke()
        raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        raw_post(conn, "m", body)
        web.append(time.perf_counter() - t)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    daemon.stop()
    vals = {}
    for line in text.splitlines():
        for k in ("appliance_runtime_invoke_seconds_sum", "appliance_runtime_invoke_seconds_count"):
            if line.startswith(k + "{"):
                vals[k] = float(line.rsplit(" ", 1)[1])
    daemon_invoke = vals["appliance_runtime_invoke_seconds_sum"] / vals["appliance_runtime_invoke_seconds_count"]
    return {"raw": raw, "http": web, "body_bytes": len(body), "daemon_invoke_mean": daemon_invoke}


async def _throughput_round(port: int, name: str, body: bytes, clients: int, seconds: float) -> tuple[int, list]:
    import aiohttp

    done, lat = 0, []
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as s:
        async def client():
            nonlocal done
            while time.perf_counter() < stop:
                t = time.perf_counter()
                async with s.post(f"http://127.0.0.1:{port}/v1/models/{name}:predict", data=body,
                                  headers={"Content-Type": "application/octet-stream"}) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}")
                lat.append(time.perf_counter() - t)
                done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.perf_counter() - t0), lat


MODES = (("batching on (max_batch 32)", ["--max-batch", "32", "--batching", "on"]),
         ("batching auto (max_batch 32)", ["--max-batch", "32", "--batching", "auto"]),
         ("no batching (max_batch 1)", ["--max-batch", "1"]))


def bench_throughput(content: bytes, clients: int, seconds: float, rounds: int) -> dict:
    mdir = Path(tempfile.mkdtemp(prefix="rt-bench-t-"))
    (mdir / "m.tflite").write_bytes(content)
    Interpreter = load_interpreter_class()
    it = Interpreter(model_content=content, num_threads=1)
    d = it.get_input_details()[0]
    x = np.random.default_rng(1).random(d["shape"], dtype=np.float32)
    body = x.astype("<f4").tobytes()
    res = {label: {"rps": [], "lat": []} for label, _ in MODES}
    common = ["--pool-size", "1", "--num-threads", "1", "--max-wait-ms", "0", "--queue-size", "256",
              "--no-affinity"]
    for _ in range(rounds):
        for label, flags in MODES:
            dmn = Daemon([sys.executable, "-m", "appliance.runtime.agent"], mdir, *common, *flags)
            asyncio.run(_throughput_round(dmn.port, "m", body, clients, 0.5))  # warm-up
            rps, lat = asyncio.run(_throughput_round(dmn.port, "m", body, clients, seconds))
            res[label]["rps"].append(rps)
            res[label]["lat"] += lat
            dmn.stop()
    return res


async def engine_throughput(content: bytes, mode: str, seconds: float, clients: int = 32) -> float:
    from appliance.runtime.config import ModelSettings
    from appliance.runtime.engine import ModelRunner

    r = ModelRunner("m", "1", content, ModelSettings(max_batch=32 if mode != "off" else 1, max_wait_ms=0,
                                                     queue_size=256, batching=mode))
    r.start()
    x = np.zeros((1, *r.input.shape[1:]), r.input.dtype)
    done, stop = 0, time.perf_counter() + seconds

    async def client():
        nonlocal done
        while time.perf_counter() < stop:
            await r.predict(x)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    rate = done / (time.perf_counter() - t0)
    await r.close()
    return rate


def cold_start(argv_prefix: list[str], model_dir: Path, x: np.ndarray, runs: int, env=None) -> list[float]:
    times = []
    body = x.astype("<f4").tobytes()
    for _ in range(runs):
        t0 = time.perf_counter()
        d = Daemon(argv_prefix, model_dir, "--no-affinity", env=env)
        conn = http.client.HTTPConnection("127.0.0.1", d.port)
        raw_post(conn, "m", body)
        times.append(time.perf_counter() - t0)
        conn.close()
        d.stop()
    return times


def bundle_sizes() -> list[tuple[str, int, Path]]:
    rows = []
    for m in sorted((cache.cache_root() / "agent-bundle").glob("*/manifest.json")):
        doc = json.loads(m.read_text())
        rows.append((f"{doc['arch']}/{doc['suite']}/{doc['backend']}", doc["bytes"], m.parent / "appliance-agent",
                     m.stat().st_mtime))
    latest = {}
    for label, size, path, mtime in rows:  # newest bundle per combination
        if label not in latest or latest[label][2] < mtime:
            latest[label] = (size, path, mtime)
    return [(k, v[0], v[1]) for k, v in sorted(latest.items())]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-bundle", action="store_true")
    a = ap.parse_args()
    q = a.quick
    mods = mediapipe_models()
    print(f"# runtime benchmark  (cpus={len(os.sched_getaffinity(0))}, loadavg={os.getloadavg()[0]:.1f})\n")

    print("## 1. latency, HTTP (raw body, 1 sequential client) vs Interpreter.invoke, alternating")
    print("| model (mediapipe 0.10.14) | n | raw p50 ms | HTTP p50 ms | p50 ratio (<= 1.05) "
          "| raw p99 ms | HTTP p99 ms | p99 ratio | invoke inside the daemon, mean ms |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name in LATENCY_MODELS:
        n = (60 if q else 200) if "lite" in name else (20 if q else 60)
        r = bench_latency(mods / f"{name}.tflite", rounds=1, per_round=n)
        raw50, raw99 = pct(r["raw"], 50) * 1e3, pct(r["raw"], 99) * 1e3
        web50, web99 = pct(r["http"], 50) * 1e3, pct(r["http"], 99) * 1e3
        print(f"| {name} ({r['body_bytes'] // 1024} KiB in) | {n} | {raw50:.2f} | {web50:.2f} | "
              f"{web50 / raw50:.3f} | {raw99:.2f} | {web99:.2f} | {web99 / raw99:.3f} | "
              f"{r['daemon_invoke_mean'] * 1e3:.2f} |")
    print()

    rounds, secs = (1, 2.0) if q else (2, 4.0)
    for label, content in ((f"{THROUGHPUT_MODEL}.tflite (mediapipe, conv net)",
                            (mods / f"{THROUGHPUT_MODEL}.tflite").read_bytes()),
                           ("tinymodels fully_connected_f32(1024, 1024) (weight-bound, 4 MB)",
                            tinymodels.fully_connected_f32(1024, 1024))):
        t = bench_throughput(content, clients=32, seconds=secs, rounds=rounds)
        base = statistics.median(t[MODES[-1][0]]["rps"])
        print(f"## 2. throughput, 32 concurrent clients: {label}, {rounds} round(s) x {secs:.0f} s")
        print("| mode | req/s (median) | vs no batching (target >= 2) | p50 ms | p99 ms |\n|---|---|---|---|---|")
        for mode, _ in MODES:
            v = statistics.median(t[mode]["rps"])
            print(f"| {mode} | {v:.0f} | {v / base:.2f} | {pct(t[mode]['lat'], 50) * 1e3:.1f} | "
                  f"{pct(t[mode]['lat'], 99) * 1e3:.1f} |")
        print()

    print("## 2b. the same without HTTP: 32 coroutines calling ModelRunner.predict in-process")
    print("| model | batching on req/s | off req/s | ratio |\n|---|---|---|---|")
    for label, content in (("face_landmark (conv net)", (mods / f"{THROUGHPUT_MODEL}.tflite").read_bytes()),
                           ("fully_connected_f32(1024, 1024)", tinymodels.fully_connected_f32(1024, 1024))):
        on, off = [], []
        for _ in range(rounds):
            on.append(asyncio.run(engine_throughput(content, "on", secs / 2)))
            off.append(asyncio.run(engine_throughput(content, "off", secs / 2)))
        print(f"| {label} | {statistics.median(on):.0f} | {statistics.median(off):.0f} | "
              f"{statistics.median(on) / statistics.median(off):.2f} |")
    print()

    if a.skip_bundle:
        return 0
    print("## 3. bundle size and cold start to first prediction")
    sizes = bundle_sizes()
    print("| bundle | size on disk MB |\n|---|---|")
    for label, size, _ in sizes:
        print(f"| {label} | {size / 1e6:.1f} |")
    mdir = Path(tempfile.mkdtemp(prefix="rt-bench-c-"))
    (mdir / "m.tflite").write_bytes((mods / f"{THROUGHPUT_MODEL}.tflite").read_bytes())
    it = load_interpreter_class()(model_path=str(mdir / "m.tflite"))
    x = np.zeros(it.get_input_details()[0]["shape"], np.float32)
    runs = 3 if q else 5
    rows = [("plain python (.venv, ai-edge-litert)",
             cold_start([sys.executable, "-m", "appliance.runtime.agent"], mdir, x, runs))]
    host_ok = {label: path for label, _, path in sizes if label.startswith("amd64/bookworm")}
    for label, path in host_ok.items():  # bookworm bundles run on this bookworm host
        rows.append((f"bundle {label}", cold_start([str(path / "appliance-agent")], mdir, x, runs)))
    for label, _, path in sizes:
        if label.startswith("amd64/trixie"):  # needs trixie's glibc: run in its builder chroot
            from appliance.image import bundle as B
            root, _ = B.build_chroot(B.plan_bundle("amd64", "trixie"))
            def wrap(args, root=root, path=path):
                return B.chroot_command(root, ["/opt/appliance/appliance-agent", *args],
                                        {"/opt/appliance": path, "/tmp": Path("/tmp")})
            rows.append((f"bundle {label} (in trixie chroot)",
                         cold_start(wrap, mdir, x, runs, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})))
    base = statistics.median(rows[0][1])
    print("\n| start to first prediction | median ms | vs plain python |\n|---|---|---|")
    for label, ts in rows:
        print(f"| {label} | {statistics.median(ts) * 1e3:.0f} | {statistics.median(ts) / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
