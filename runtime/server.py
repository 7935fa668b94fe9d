"""The inference daemon: aiohttp app, model registry with hot reload, lifecycle.

HTTP API
  POST /v1/models/{name}:predict
       JSON  (Content-Type: application/json): {"inputs": <nested list, leading dim = rows>}
             -> {"model", "version", "outputs": [<nested list> per output], "shapes", "dtypes"}
       raw   (Content-Type: application/octet-stream): the input tensor's bytes, little-endian,
             in the model's input dtype; optional header X-Tensor-Shape: "2,16" (else rows are
             inferred from the size) -> output 0 as raw little-endian bytes with
             X-Tensor-Shape / X-Tensor-Dtype / X-Model-Version headers.
  GET /v1/models          name, version, input/output shapes and dtypes, batching settings
  GET /healthz            200 while the event loop runs
  GET /readyz             200 if every model in the sources is served, else 503; per-model
                          state and failure reasons in the body. GET /readyz/{name}: one model.
  GET /metrics            Prometheus text format
Errors are JSON {"error": "..."}: 4xx for anything the client sent, 429 when a model's queue
is full, 504 when a request exceeds its timeout.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import sdnotify
from .config import ConfigError, RuntimeConfig
from .engine import ModelRunner, Overloaded, RequestError, RunnerClosed, Timing
from .loader import DirectorySource, ModelSource, MultiSource
from .metrics import Metrics

log = logging.getLogger("appliance.runtime")


def one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return next((l.strip() for l in text.splitlines() if l.strip()), text)[:300]


def make_source(cfg: RuntimeConfig) -> ModelSource:
    sources: list[ModelSource] = []
    if cfg.store_dir is not None:
        # Imported only when configured: the secure store needs a PKCS#11 token.
        from appliance.secure.agent import DEFAULTS
        vendor_key = os.environ.get("APPLIANCE_VENDOR_KEY") or DEFAULTS["APPLIANCE_VENDOR_KEY"]
        if not os.path.exists(vendor_key):
            # An image built without a vendor key can never accept a package: serve the plain
            # directory rather than nothing (the same unit file serves both kinds of image).
            log.warning("secure store %s disabled: no vendor public key %s in this image",
                        cfg.store_dir, vendor_key)
        else:
            try:
                from appliance.secure.source import SecureModelSource
                env = dict(os.environ, APPLIANCE_STORE_DIR=str(cfg.store_dir))
                sources.append(SecureModelSource.from_env(env))
            except Exception as e:
                raise ConfigError(f"store_dir {cfg.store_dir}: secure store unavailable: {one_line(e)}") from None
    sources.append(DirectorySource(cfg.model_dir))
    return sources[0] if len(sources) == 1 else MultiSource(sources)


class ModelRegistry:
    """The served runner per model name, and why the others failed."""

    def __init__(self, source: ModelSource, cfg: RuntimeConfig, metrics: Metrics):
        self.source, self.cfg, self.metrics = source, cfg, metrics
        self.runners: dict[str, ModelRunner] = {}
        self.failures: dict[str, str] = {}
        self._closing: set[asyncio.Task] = set()
        self._reload_lock = asyncio.Lock()
        self.active = 0  # predict requests being handled (headers in, answer not yet built)

    def _alone(self) -> bool:
        # One request in a handler is not enough: under load the handlers of already received
        # requests run one after another without ever overlapping. Callbacks waiting in the
        # loop's ready queue are requests (or answers) in the pipeline. asyncio's default loop
        # keeps them in `_ready`; another loop without it never runs inline.
        return self.active <= 1 and not getattr(asyncio.get_running_loop(), "_ready", True)

    async def reload(self) -> None:
        """Load new and changed models, drop removed ones. Safe to call any time."""
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            try:
                names = await loop.run_in_executor(None, self.source.names)
            except Exception as e:
                log.error("listing models failed: %s", one_line(e))
                return
            for gone in set(self.runners) - set(names):
                self._retire(self.runners.pop(gone))
                self.metrics.model_ready.labels(gone).set(0)
            for gone in set(self.failures) - set(names):
                self.failures.pop(gone)
            for name in names:
                await self._load(name)

    async def _load(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        current = self.runners.get(name)
        peek = getattr(self.source, "version", None)
        if current is not None and peek is not None:
            # Cheap check first: the secure store would otherwise unwrap on the token and
            # decrypt the whole model every reload interval just to find nothing changed.
            try:
                if await loop.run_in_executor(None, peek, name) == current.version:
                    self.failures.pop(name, None)
                    return
            except Exception:
                pass  # no cheap answer: load() below decides, with its full checks
        try:
            blob = await loop.run_in_executor(None, self.source.load, name)
            if current is not None and current.version == blob.version:
                self.failures.pop(name, None)
                return
            settings = self.cfg.settings_for(name)
            runner = await loop.run_in_executor(
                None, lambda: ModelRunner(name, blob.version, blob.content, settings, self.metrics))
        except Exception as e:
            reason = one_line(e)
            if current is not None:
                reason = f"new version failed, still serving {current.version}: {reason}"
            if self.failures.get(name) != reason:
                log.error("model %s: %s", name, reason)
            self.failures[name] = reason
            if current is None:
                self.metrics.model_ready.labels(name).set(0)
            return
        runner.start()
        if self.cfg.settings_for(name).inline_when_idle:
            runner.inline_ok = self._alone
        self.runners[name] = runner  # new requests go to the new version from here on
        self.failures.pop(name, None)
        self.metrics.load_seconds.labels(name).set(runner.load_seconds)
        self.metrics.model_ready.labels(name).set(1)
        if current is not None:
            self.metrics.reloads.labels(name).inc()
            log.info("model %s: version %s replaces %s", name, runner.version, current.version)
            self._retire(current)
        else:
            log.info("model %s: version %s loaded in %.1f ms", name, runner.version, runner.load_seconds * 1e3)

    def _retire(self, runner: ModelRunner) -> None:
        # The old version finishes everything it has queued before its interpreters go.
        t = asyncio.get_running_loop().create_task(runner.close())
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for r in list(self.runners.values()):
            self._retire(r)
        self.runners.clear()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def readiness(self) -> dict:
        models = {n: {"ready": True, "version": r.version} for n, r in self.runners.items()}
        for n, reason in self.failures.items():
            models.setdefault(n, {"ready": False})["error"] = reason
        return models


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason if e.text is None or e.text.startswith(str(e.status)) else e.text)
    except Exception:  # never a traceback to the client; log it, answer 500
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal error (see the daemon log)")


def _parse_json(body: bytes, runner: ModelRunner) -> np.ndarray:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {one_line(e)}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise RequestError(400, 'JSON body must be an object with key "inputs"')
    try:
        arr = np.asarray(doc["inputs"])
    except (ValueError, TypeError) as e:
        raise RequestError(400, f'"inputs" is not a rectangular array: {one_line(e)}') from None
    want = runner.input.dtype
    if arr.dtype.kind not in "iuf" or arr.size == 0:
        raise RequestError(400, f'"inputs" must be a non-empty array of numbers (got {arr.dtype.kind!r} '
                                f'values, size {arr.size})')
    if want.kind in "iu":
        if arr.dtype.kind == "f":
            raise RequestError(400, f"model input is {want.name}: values must be integers")
        info = np.iinfo(want)
        if arr.min() < info.min or arr.max() > info.max:
            raise RequestError(400, f"values outside the {want.name} range [{info.min}, {info.max}]")
    elif want.kind == "f":
        with np.errstate(over="ignore"):
            cast = arr.astype(want)
        if not np.all(np.isfinite(cast)):
            raise RequestError(400, f"values not finite as {want.name}")
        return cast
    return arr.astype(want)


def _parse_raw(body: bytes, headers, runner: ModelRunner) -> np.ndarray:
    spec = runner.input
    dt = spec.dtype.newbyteorder("<")
    if not body:
        raise RequestError(400, "empty body")
    if len(body) % dt.itemsize:
        raise RequestError(400, f"body of {len(body)} bytes is not a whole number of {spec.dtype.name} values")
    shape_hdr = headers.get("X-Tensor-Shape")
    if shape_hdr is not None:
        try:
            shape = tuple(int(v) for v in shape_hdr.split(","))
            if any(v < 0 for v in shape):
                raise ValueError
        except ValueError:
            raise RequestError(400, f"X-Tensor-Shape {shape_hdr!r} is not a comma-separated list of sizes") from None
    else:
        row = math.prod(spec.shape[1:]) if runner.batchable else math.prod(spec.shape)
        n = len(body) // dt.itemsize
        if row == 0 or n % row:
            raise RequestError(400, f"body has {n} values, not a multiple of the {row} values per row")
        shape = (n // row, *spec.shape[1:]) if runner.batchable else spec.shape
    if math.prod(shape) * dt.itemsize != len(body):  # Python ints: no int64 wrap-around
        raise RequestError(400, f"body of {len(body)} bytes does not match X-Tensor-Shape {list(shape)}")
    return np.frombuffer(body, dtype=dt).astype(spec.dtype, copy=False).reshape(shape)


def make_app(registry: ModelRegistry, cfg: RuntimeConfig) -> web.Application:
    metrics = registry.metrics
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[_errors_as_json])

    async def predict(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        t0 = time.perf_counter()
        label = name if (name in registry.runners or name in registry.failures) else "_unknown"
        status = 500
        registry.active += 1
        try:
            resp = await _predict(request, name, t0)
            status = resp.status
            return resp
        except RequestError as e:
            status = e.status
            return _error(e.status, str(e))
        except Overloaded as e:
            status = 429
            return _error(429, str(e), {"Retry-After": "1"})
        except asyncio.TimeoutError:
            status = 504
            return _error(504, f"model {name}: request exceeded its timeout")
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            registry.active -= 1
            metrics.count(label, status)
            if status == 200:
                metrics.observe_latency(label, time.perf_counter() - t0)

    async def _predict(request: web.Request, name: str, t0: float) -> web.StreamResponse:
        runner = registry.runners.get(name)
        if runner is None:
            why = registry.failures.get(name)
            raise RequestError(404, f"model {name!r} is not loaded: {why}" if why else f"unknown model {name!r}")
        body = await request.read()  # client_max_size -> 413 before we get here
        t_read = time.perf_counter()
        ctype = request.content_type
        raw = ctype == "application/octet-stream"
        if ctype == "application/json":
            x = _parse_json(body, runner)
        elif raw:
            x = _parse_raw(body, request.headers, runner)
        else:
            raise RequestError(415, f"Content-Type {ctype!r} not supported; use application/json "
                                    "or application/octet-stream")
        timing = Timing()
        for _attempt in range(3):
            try:
                # A raw response carries output 0 only: the others are not even copied.
                outs = await runner.predict(x, timing, (0,) if raw else None)
                break
            except RunnerClosed:  # swapped by a hot reload between lookup and enqueue
                runner = registry.runners.get(name)
                if runner is None:
                    raise RequestError(404, f"model {name!r} was removed") from None
        else:
            raise RequestError(409, f"model {name!r} is reloading; retry")
        # W3C Server-Timing: a client (or the benchmark) can tell the model's own time from
        # the HTTP and queueing overhead of this very request.
        # read = waiting for the body after the headers; handler = headers in -> answer built.
        server_timing = (f"read;dur={(t_read - t0) * 1e3:.3f}, queue;dur={timing.queue_s * 1e3:.3f}, "
                         f"invoke;dur={timing.invoke_s * 1e3:.3f}, "
                         f"handler;dur={(time.perf_counter() - t0) * 1e3:.3f}")
        if raw:
            o = outs[0]
            if o.dtype.byteorder == ">":  # the wire format is little-endian
                o = o.astype(o.dtype.newbyteorder("<"))
            # The output is a private copy already (engine): hand its buffer over, no tobytes().
            return web.Response(body=memoryview(np.ascontiguousarray(o)).cast("B"),
                                content_type="application/octet-stream",
                                headers={"X-Tensor-Shape": ",".join(map(str, o.shape)),
                                         "X-Tensor-Dtype": runner.output_dtype_names[0],
                                         "X-Model-Version": runner.version,
                                         "Server-Timing": server_timing})
        return web.json_response({
            "model": name, "version": runner.version,
            "outputs": [o.tolist() for o in outs],
            "shapes": [list(o.shape) for o in outs], "dtypes": [o.dtype.name for o in outs],
        }, headers={"Server-Timing": server_timing})

    async def list_models(_request):
        return web.json_response({"models": [r.describe() for _, r in sorted(registry.runners.items())]})

    async def healthz(_request):
        return web.json_response({"status": "ok"})

    async def readyz(request):
        models = registry.readiness()
        name = request.match_info.get("name")
        if name is not None:
            if name not in models:
                return _error(404, f"unknown model {name!r}")
            m = models[name]
            return web.json_response({name: m}, status=200 if m["ready"] and "error" not in m else 503)
        ok = bool(models) and not registry.failures
        return web.json_response({"ready": ok, "models": models}, status=200 if ok else 503)

    async def metrics_handler(_request):
        for n, r in list(registry.runners.items()):
            metrics.queue_depth.labels(n).set(r.queue_depth())
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_post(r"/v1/models/{name:[^/:]+}:predict", predict)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/readyz/{name}", readyz)
    app.router.add_get("/metrics", metrics_handler)
    return app


class Server:
    """One daemon instance; ``start()``/``stop()`` from a running event loop (tests use it
    in-process, ``serve()`` wraps it with signals and sd_notify)."""

    def __init__(self, cfg: RuntimeConfig, source: ModelSource | None = None):
        self.cfg = cfg
        self.metrics = Metrics()
        self.registry = ModelRegistry(source or make_source(cfg), cfg, self.metrics)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self.registry.reload()
        self._runner = web.AppRunner(make_app(self.registry, self.cfg), handle_signals=False,
                                     access_log=None, shutdown_timeout=self.cfg.defaults.timeout_s + 1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - real port for port 0
        if self.cfg.reload_interval_s > 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._reload_loop()))

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            await self.registry.reload()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()  # stop listening, let in-flight handlers finish
        await self.registry.close()


async def serve(cfg: RuntimeConfig, port_file: str | None = None) -> int:
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_now = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    server = Server(cfg)
    await server.start()
    if port_file:
        tmp = f"{port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{server.port}\n")
        os.replace(tmp, port_file)
    reg = server.registry
    status = f"serving {len(reg.runners)} model(s) on {cfg.host}:{server.port}"
    if reg.failures:
        status += f"; failed: {', '.join(sorted(reg.failures))}"
    log.info("%s", status)
    sdnotify.notify("READY=1", f"STATUS={status}")
    watchdog = sdnotify.watchdog_task()

    async def on_hup():
        while True:
            await reload_now.wait()
            reload_now.clear()
            await reg.reload()

    hup = loop.create_task(on_hup())
    await stop.wait()
    sdnotify.notify("STOPPING=1", "STATUS=draining")
    log.info("SIGTERM: draining in-flight requests")
    hup.cancel()
    await server.stop()
    if watchdog is not None:  # keep petting the watchdog while draining
        watchdog.cancel()
    log.info("stopped")
    return 0
