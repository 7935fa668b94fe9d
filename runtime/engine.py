"""Model runners: a pool of TFLite interpreters per model version, fed by a dynamic batcher.

A request is one array whose leading dimension is its row count. The batcher takes the first
queued request, waits up to ``max_wait_ms`` for more rows (up to ``max_batch``), concatenates
them into one invoke and splits the output. It only forms a batch when an interpreter is free,
so under load requests pile up in the queue and batches grow by themselves.

Interpreters are not thread-safe: each one is used by one worker thread at a time (a free-list
guarded by the pool semaphore). Inference runs in threads so the event loop keeps serving.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from .config import ModelSettings
from .interp import load_interpreter_class

log = logging.getLogger("appliance.runtime")


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
    __slots__ = ("x", "future", "t0", "cancelled")

    def __init__(self, x: np.ndarray, future: asyncio.Future):
        self.x = x
        self.future = future
        self.t0 = time.perf_counter()
        self.cancelled = False


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
        self.load_seconds = time.perf_counter() - t0
        it = self._free[0]
        ins, outs = it.get_input_details(), it.get_output_details()
        if len(ins) != 1:
            raise ValueError(f"model has {len(ins)} inputs; this runtime serves single-input models")
        self.input = self._spec(ins[0])
        self.outputs = [self._spec(o) for o in outs]
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
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._sem: asyncio.Semaphore | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.pool_size, thread_name_prefix=f"tflite-{name}")
        self._inflight: set[asyncio.Future] = set()
        self.closed = False

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
        self._queue = asyncio.Queue(maxsize=self.settings.queue_size)
        self._sem = asyncio.Semaphore(self.settings.pool_size)
        self._task = asyncio.get_running_loop().create_task(self._batch_loop(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop taking requests, finish every queued and running one, then free the pool."""
        self.closed = True
        if self._queue is not None:
            await self._queue.join()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

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

    async def predict(self, x: np.ndarray) -> list[np.ndarray]:
        if self.closed:
            raise RunnerClosed()
        x = self.check_input(x)
        fut = asyncio.get_running_loop().create_future()
        item = _Item(x, fut)
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise Overloaded(f"model {self.name}: queue full ({self.settings.queue_size})") from None
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(self._queue.qsize())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.settings.timeout_s)
        except asyncio.TimeoutError:
            item.cancelled = True  # the batcher drops it if it has not started yet
            raise

    async def _batch_loop(self) -> None:
        q = self._queue
        max_rows = self.settings.max_batch if self.merge else 1
        wait = self.settings.max_wait_ms / 1000.0
        loop = asyncio.get_running_loop()
        while True:
            await self._sem.acquire()
            first = await q.get()
            batch, rows = [first], first.x.shape[0] if self.batchable else 1
            deadline = loop.time() + wait
            while self.merge and rows < max_rows:
                try:
                    nxt = q.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(q.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if rows + nxt.x.shape[0] > max_rows:
                    # Does not fit: run it first in the next batch (put back at the front).
                    # (get() does not touch the unfinished-task count, so join() stays right.)
                    q._queue.appendleft(nxt)  # noqa: SLF001 - asyncio.Queue has no push-front
                    break
                batch.append(nxt)
                rows += nxt.x.shape[0]
            live = [it for it in batch if not it.cancelled]
            for it in batch:
                if it.cancelled:
                    q.task_done()
            if self.metrics:
                self.metrics.queue_depth.labels(self.name).set(q.qsize())
            if not live:
                self._sem.release()
                continue
            fut = loop.run_in_executor(self._executor, self._invoke, [it.x for it in live])
            self._inflight.add(fut)
            fut.add_done_callback(lambda f, live=live: self._deliver(f, live))

    def _deliver(self, f: asyncio.Future, live: list[_Item]) -> None:
        self._inflight.discard(f)
        self._sem.release()
        try:
            outs = f.result()
        except Exception as e:  # an interpreter error is the server's fault
            log.error("model %s: invoke failed: %s", self.name, e)
            for it in live:
                if not it.future.done():
                    it.future.set_exception(e)
                self._queue.task_done()
            return
        start = 0
        for it in live:
            n = it.x.shape[0] if self.batchable else 1
            res = [o[start:start + n] for o in outs] if self.batchable else outs
            start += n
            if not it.future.done():
                it.future.set_result(res)
            self._queue.task_done()
        if self.metrics:
            self.metrics.batch_size.labels(self.name).observe(start if self.batchable else 1)

    # ---- worker thread ----
    def _new_interpreter(self, rows: int):
        it = load_interpreter_class()(model_content=self._content, num_threads=self.settings.num_threads)
        it.resize_tensor_input(self._in_index, [rows, *self.input.shape[1:]])
        it.allocate_tensors()
        return it

    def _invoke(self, xs: list[np.ndarray]) -> list[np.ndarray]:
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
            outs = [it.get_tensor(i).copy() for i in self._out_index]
            if self.metrics:
                self.metrics.invoke_seconds.labels(self.name).observe(time.perf_counter() - t0)
            return outs
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
