"""Model runners: a pool of TFLite interpreters per model version, fed by a dynamic batcher.

A request is one array whose leading dimension is its row count. Requests wait in a bounded
queue; a batch is formed only when an interpreter is free, so under load requests pile up and
batches grow by themselves. When merging, the oldest queued request waits at most
``max_wait_ms`` (from its arrival) for company, up to ``max_batch`` rows; the rows are
concatenated into one invoke and the output is split.

The dispatch is event-driven (no batcher task): a new request, a finished invoke and the
max-wait timer each call ``_pump()``, so an idle model hands a request to a worker thread in
the same event-loop step it arrived in, with no extra task switches (every loop iteration
and thread wake-up is latency on a small CPU).

Interpreters are not thread-safe: each one is used by one worker thread at a time (a free-list
of interpreter slots, one per pool member). Inference runs in threads so the event loop keeps
serving while a model computes.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from .config import ModelSettings
from .interp import load_interpreter_class

log = logging.getLogger("appliance.runtime")

# Handing an invoke to a worker thread and its result back costs two thread wake-ups (about
# 0.07 ms on an idle 2-core VM, more under load). A model that does not merge requests and
# whose invoke is cheaper than that runs on the event loop even under load: the hand-off
# would cost more than the work, and the loop is blocked for less than the hand-off anyway.
CHEAP_INVOKE_S = 100e-6


class RequestError(Exception):
    """The client's fault (-> 4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Overloaded(Exception):
    pass


class RunnerClosed(Exception):
    """The runner was replaced by a new version; retry on the current one."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]        # as allocated (batch 1)
    signature: tuple[int, ...]    # -1 for dynamic dims
    dtype: np.dtype

    def describe(self) -> dict:
        return {"name": self.name, "shape": list(self.signature), "dtype": self.dtype.name}


class _Item:
    __slots__ = ("x", "rows", "want", "future", "t0", "t_start", "invoke_s")

    def __init__(self, x: np.ndarray, rows: int, want: tuple[int, ...], future: asyncio.Future):
        self.x = x
        self.rows = rows
        self.want = want                # output positions the caller needs
        self.future = future
        self.t0 = time.perf_counter()   # arrival
        self.t_start = 0.0              # handed to a worker
        self.invoke_s = 0.0             # the interpreter's time for the batch it ran in


@dataclass
class Timing:
    """Where one request's time went inside the runner (filled in by ``predict``)."""
    queue_s: float = 0.0    # arrival -> handed to an interpreter
    invoke_s: float = 0.0   # set_tensor + invoke + output copy of its batch
    rows: int = 0           # rows in that batch


def _time_invoke(it, index: int, x: np.ndarray, n: int) -> float:
    it.set_tensor(index, x)
    it.invoke()  # warm-up (first invoke prepares kernels)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        it.invoke()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def decide_merge(t1: float, tb: float, b: int, threshold: float = 0.8) -> tuple[bool, str]:
    """Merge requests if a batch of b costs under `threshold` x b single invokes."""
    per_row = tb / b
    verdict = per_row < threshold * t1
    why = (f"auto: batch {b} costs {per_row * 1e3:.3f} ms/row vs {t1 * 1e3:.3f} ms at batch 1"
           f" -> {'merging' if verdict else 'not merging'}")
    return verdict, why


class ModelRunner:
    def __init__(self, name: str, version: str, content: bytes, settings: ModelSettings,
                 metrics=None):
        self.name, self.version, self.settings = name, version, settings
        self.metrics = metrics
        Interpreter = load_interpreter_class()
        t0 = time.perf_counter()
        # Building every interpreter up front validates the model: a corrupt file fails here.
        self._free = []
        for _ in range(settings.pool_size):
            it = Interpreter(model_content=content, num_threads=settings.num_threads)
            it.allocate_tensors()
            self._free.append(it)
        it = self._free[0]
        ins, outs = it.get_input_details(), it.get_output_details()
        if len(ins) != 1:
            raise ValueError(f"model has {len(ins)} inputs; this runtime serves single-input models")
        # Warm-up: an interpreter's first invoke also prepares its kernels (XNNPACK packs the
        # weights then), which made the first request after every (re)load several times
        # slower than the rest. Paying it here keeps it out of request latency, and a model
        # that cannot run even once is refused at load, while the old version still serves.
        zeros = np.zeros(ins[0]["shape"], ins[0]["dtype"])
        for w in self._free:
            w.set_tensor(ins[0]["index"], zeros)
            w.invoke()
        self.load_seconds = time.perf_counter() - t0  # build + allocate + warm-up, all interpreters
        self.input = self._spec(ins[0])
        self.outputs = [self._spec(o) for o in outs]
        self.output_dtype_names = [o.dtype.name for o in self.outputs]  # dtype.name is slow-ish
        self._in_index = ins[0]["index"]
        self._out_index = [o["index"] for o in outs]
        # Batchable: a dynamic leading dim, or a fixed batch of 1 that survives resizing
        # (many converted models declare [1, ...] but run fine with [n, ...]).
        self.batchable = len(self.input.signature) >= 1 and self.input.signature[0] == -1
        if not self.batchable and settings.max_batch > 1:
            self.batchable = self._probe_batch_resize(it)
        if not self.batchable:
            self.input = TensorSpec(self.input.name, self.input.shape, self.input.shape, self.input.dtype)
        elif self.input.signature[0] != -1:
            self.input = TensorSpec(self.input.name, self.input.shape, (-1, *self.input.shape[1:]),
                                    self.input.dtype)
            self.outputs = [TensorSpec(o.name, o.shape, (-1, *o.shape[1:]), o.dtype) for o in self.outputs]
        self._content = content
        # Batch-size buckets (powers of two up to max_batch); a slot maps bucket -> interpreter.
        self._buckets: list[int] = []
        if self.batchable:
            b = 1
            while b < settings.max_batch:
                self._buckets.append(b)
                b *= 2
            self._buckets.append(settings.max_batch)
        base_rows = self.input.shape[0] if self.batchable else 0
        self._free = [{base_rows: i} for i in self._free]
        # merge: whether the batcher combines requests. Batching only pays where a batch of n
        # costs much less than n single invokes; conv nets under XNNPACK often cost MORE per
        # row at batch > 1 (measured: mediapipe face_landmark 0.77 ms/row at 1, 3.8 at 4), so
        # "auto" measures it at load.
        self.merge, self.batching_reason = False, "model has no batch dimension"
        if settings.max_batch == 1:
            self.batching_reason = "off (max_batch 1)"
        if self.batchable:
            mode = settings.batching
            if settings.max_batch == 1 or mode == "off":
                self.merge, self.batching_reason = False, f"off (max_batch {settings.max_batch}, mode {mode})"
            elif mode == "on":
                self.merge, self.batching_reason = True, "on (configured)"
            else:
                self.merge, self.batching_reason = self._measure_merge()
        self._lock = threading.Lock()
        self._pending: collections.deque[_Item] = collections.deque()
        self._pending_rows = 0
        self._idle = settings.pool_size        # interpreters not running a batch
        self._inflight = 0                     # batches handed to workers, not yet delivered
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drained: asyncio.Event | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.pool_size, thread_name_prefix=f"tflite-{name}")
        self._all_outputs = tuple(range(len(self._out_index)))
        # Set by the server: true while the daemon handles no other request (see _pump).
        # None: never run on the event loop (inline_when_idle = false).
        self.inline_ok = None
        self._invoke_avg = float("inf")  # moving average of one invoke, seconds
        self.closed = False
        self._queue_gauge = self._batch_hist = self._invoke_hist = self._inline_count = None
        if metrics is not None:  # label lookups cost microseconds each: once, not per request
            self._queue_gauge = metrics.queue_depth.labels(name)
            self._inline_count = metrics.inline_invokes.labels(name)
            self._batch_hist = metrics.batch_size.labels(name)
            self._invoke_hist = metrics.invoke_seconds.labels(name)

    def _measure_merge(self) -> tuple[bool, str]:
        b = min(self.settings.max_batch, 4)
        slot = self._free[0]
        base = next(iter(slot.values()))
        x1 = np.zeros(self.input.shape, self.input.dtype)
        xb = np.zeros((b, *self.input.shape[1:]), self.input.dtype)
        if b not in slot:
            slot[b] = self._new_interpreter(b)
        # Interleaved, best of 3: on a shared, bursty CPU the minimum is the stable statistic.
        t1s, tbs = [], []
        for _ in range(3):
            t1s.append(_time_invoke(base, self._in_index, x1, 1))
            tbs.append(_time_invoke(slot[b], self._in_index, xb, 1))
        return decide_merge(min(t1s), min(tbs), b)

    def _probe_batch_resize(self, it) -> bool:
        """True if resizing the input's leading dim 1 -> 2 gives every output a leading 2."""
        shape = self.input.shape
        if len(shape) < 1 or shape[0] != 1:
            return False
        idx = it.get_input_details()[0]["index"]
        try:
            it.resize_tensor_input(idx, [2, *shape[1:]])
            it.allocate_tensors()
            ok = all(len(o["shape"]) >= 1 and o["shape"][0] == 2 and tuple(o["shape"][1:]) == s.shape[1:]
                     for o, s in zip(it.get_output_details(), self.outputs))
        except Exception:
            ok = False
        it.resize_tensor_input(idx, list(shape))
        it.allocate_tensors()
        return ok

    @staticmethod
    def _spec(d: dict) -> TensorSpec:
        sig = d.get("shape_signature")
        sig = tuple(int(v) for v in (sig if sig is not None and len(sig) else d["shape"]))
        return TensorSpec(d["name"], tuple(int(v) for v in d["shape"]), sig, np.dtype(d["dtype"]))

    # ---- lifecycle (inside the event loop) ----
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._drained.set()

    async def close(self) -> None:
        """Stop taking requests, finish every queued and running one, then free the pool."""
        self.closed = True
        if self._drained is not None:
            while self._pending or self._inflight:
                self._drained.clear()
                await self._drained.wait()
        if self._timer is not None:
            self._timer.cancel()
        self._executor.shutdown(wait=True)

    def queue_depth(self) -> int:
        return len(self._pending)

    # ---- requests ----
    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Validate an input array (already of the model's dtype) against the input spec."""
        spec = self.input
        if x.dtype != spec.dtype:
            raise RequestError(400, f"input dtype {x.dtype.name} does not match model input {spec.dtype.name}")
        rest_want = spec.signature[1:] if self.batchable else spec.shape
        if self.batchable:
            if x.ndim != len(spec.signature) or tuple(x.shape[1:]) != tuple(spec.shape[1:]):
                raise RequestError(400, f"input shape {list(x.shape)} does not match model input "
                                        f"{list(spec.signature)}")
            if x.shape[0] < 1 or x.shape[0] > self.settings.max_batch:
                raise RequestError(400, f"input has {x.shape[0]} rows; allowed 1..{self.settings.max_batch}")
        elif tuple(x.shape) != tuple(rest_want):
            raise RequestError(400, f"input shape {list(x.shape)} does not match model input {list(spec.shape)}")
        return x

    async def predict(self, x: np.ndarray, timing: Timing | None = None,
                      outputs: tuple[int, ...] | None = None) -> list[np.ndarray]:
        """Run one request and return its outputs (all, or the positions in ``outputs``, in
        that order: an output nobody asked for is never copied out of the interpreter, which
        for e.g. a pose model's 900 KB of heatmaps is most of the per-request overhead).
        ``timing``, if given, gets the request's queue and invoke times."""
        if self.closed:
            raise RunnerClosed()
        x = self.check_input(x)
        if len(self._pending) >= self.settings.queue_size:
            raise Overloaded(f"model {self.name}: queue full ({self.settings.queue_size})")
        loop = self._loop
        want = self._all_outputs if outputs is None else tuple(outputs)
        item = _Item(x, x.shape[0] if self.batchable else 1, want, loop.create_future())
        self._pending.append(item)
        self._pending_rows += item.rows
        self._pump()
        fut = item.future
        timer = None if fut.done() else loop.call_later(self.settings.timeout_s, self._expire, item)
        try:
            outs = await fut
        finally:
            if timer is not None:
                timer.cancel()
            if not fut.done() or fut.cancelled():  # client went away: do not compute it
                self._drop(item)
        if timing is not None:
            timing.queue_s = item.t_start - item.t0
            timing.invoke_s = item.invoke_s
        return outs

    def _expire(self, item: _Item) -> None:
        if not item.future.done():
            # A queued request is dropped; a running one finishes and its result is discarded.
            item.future.set_exception(asyncio.TimeoutError())
        self._drop(item)

    def _drop(self, item: _Item) -> None:
        try:
            self._pending.remove(item)
        except ValueError:
            return  # already running or delivered
        self._pending_rows -= item.rows
        self._set_queue_gauge()
        self._check_drained()

    def _set_queue_gauge(self) -> None:
        if self._queue_gauge is not None:
            self._queue_gauge.set(len(self._pending))

    def _check_drained(self) -> None:
        if not self._pending and not self._inflight and self._drained is not None:
            self._drained.set()

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _pump(self) -> None:
        """Hand queued requests to free interpreters (event loop only)."""
        q = self._pending
        max_rows = self.settings.max_batch if self.merge else 1
        while self._idle and q:
            if self.merge and self._pending_rows < max_rows and self.settings.max_wait_ms > 0:
                # Not a full batch yet: the oldest request may wait a little for company.
                delay = q[0].t0 + self.settings.max_wait_ms / 1000.0 - time.perf_counter()
                if delay > 0:
                    if self._timer is None:
                        self._timer = self._loop.call_later(delay, self._on_timer)
                    break
            batch, rows = [], 0
            while q:
                nxt = q[0]
                if batch and (not self.merge or rows + nxt.rows > max_rows):
                    break  # does not fit: it leads the next batch
                q.popleft()
                self._pending_rows -= nxt.rows
                if nxt.future.done():  # timed out or abandoned while queued
                    continue
                batch.append(nxt)
                rows += nxt.rows
            if not batch:
                continue
            self._idle -= 1
            self._inflight += 1
            now = time.perf_counter()
            for it in batch:
                it.t_start = now
            if self._inflight == 1 and self.inline_ok is not None and (
                    (not q and self.inline_ok())
                    or (not self.merge and self._invoke_avg < CHEAP_INVOKE_S)):
                # Nothing else is going on in the whole daemon (or the invoke is cheaper than
                # a hand-off, see CHEAP_INVOKE_S): run it right here on the event loop thread.
                # The thread hand-off costs two wake-ups, and on a loaded CPU each wake-up may
                # wait for a time slice. A request that arrives meanwhile waits in the socket
                # until this invoke ends; with more than one request in the daemon, workers
                # are used, so the loop keeps parsing (and batches can form) while they compute.
                if self._inline_count is not None:
                    self._inline_count.inc()
                self._deliver(batch, *self._run(batch))
                continue
            self._executor.submit(self._work, batch)
        self._set_queue_gauge()
        self._check_drained()

    def _run(self, batch: list[_Item]):
        try:
            want = batch[0].want if len(batch) == 1 else tuple(sorted({i for it in batch for i in it.want}))
            return self._invoke([it.x for it in batch], want), None
        except Exception as e:  # an interpreter error is the server's fault
            return None, e

    def _work(self, batch: list[_Item]) -> None:
        """Worker thread: run one batch, hand the result back to the event loop."""
        self._loop.call_soon_threadsafe(self._deliver, batch, *self._run(batch))

    def _deliver(self, batch: list[_Item], res, err: Exception | None) -> None:
        self._idle += 1
        self._inflight -= 1
        self._pump()  # the interpreter starts on the next batch while we answer this one
        if err is not None:
            log.error("model %s: invoke failed: %s", self.name, err)
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(err)
            self._check_drained()
            return
        outs, invoke_s = res
        if not self.merge:
            avg = self._invoke_avg
            self._invoke_avg = invoke_s if avg == float("inf") else 0.8 * avg + 0.2 * invoke_s
        start = 0
        for it in batch:
            n = it.rows
            r = [outs[i][start:start + n] for i in it.want] if self.batchable else [outs[i] for i in it.want]
            start += n
            it.invoke_s = invoke_s
            if not it.future.done():
                it.future.set_result(r)
        if self._batch_hist is not None:
            self._batch_hist.observe(start)
        self._check_drained()

    # ---- worker thread ----
    def _new_interpreter(self, rows: int):
        it = load_interpreter_class()(model_content=self._content, num_threads=self.settings.num_threads)
        it.resize_tensor_input(self._in_index, [rows, *self.input.shape[1:]])
        it.allocate_tensors()
        return it

    def _invoke(self, xs: list[np.ndarray], want: tuple[int, ...] | None = None
                ) -> tuple[list[np.ndarray | None], float]:
        """Run one batch; return (outputs, seconds). Outputs not in ``want`` are None."""
        with self._lock:
            slot = self._free.pop()
        try:
            x = np.concatenate(xs, axis=0) if len(xs) > 1 else xs[0]
            key = 0
            if self.batchable:
                # Resizing a delegated interpreter re-prepares the whole graph (XNNPACK repacks
                # weights: tens of ms for a conv net), so each batch-size bucket keeps its own
                # interpreter, made on first use, and a batch is zero-padded up to its bucket.
                n = x.shape[0]
                key = next(b for b in self._buckets if b >= n)
                if key > n:
                    x = np.concatenate([x, np.zeros((key - n, *x.shape[1:]), x.dtype)])
                if key not in slot:
                    slot[key] = self._new_interpreter(key)
            it = slot[key]
            t0 = time.perf_counter()
            it.set_tensor(self._in_index, x)
            it.invoke()
            want = self._all_outputs if want is None else want
            outs = [None] * len(self._out_index)
            for i in want:
                outs[i] = it.get_tensor(self._out_index[i])  # get_tensor copies
            dt = time.perf_counter() - t0
            if self._invoke_hist is not None:
                self._invoke_hist.observe(dt)
            return outs, dt
        finally:
            with self._lock:
                self._free.append(slot)

    def describe(self) -> dict:
        return {
            "name": self.name, "version": self.version,
            "inputs": [self.input.describe()], "outputs": [o.describe() for o in self.outputs],
            "batching": {"enabled": self.merge, "max_batch": self.settings.max_batch,
                         "max_wait_ms": self.settings.max_wait_ms, "mode": self.settings.batching,
                         "reason": self.batching_reason},
        }
