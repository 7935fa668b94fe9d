"""Prometheus metrics of one server instance (own registry, so tests can run several)."""
from __future__ import annotations

import collections
import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

# Fine buckets at the low end: tiny models answer in well under a millisecond, and the
# p50/p95/p99 that histogram_quantile() derives are only as good as the buckets.
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                   0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
QUANTILES = (0.5, 0.95, 0.99)
WINDOW = 2048  # latest requests per model behind the exact p50/p95/p99 gauges


class _LatencyWindow:
    """Exact p50/p95/p99 over each model's latest WINDOW successful requests, computed at
    scrape time (the histogram gives the long-run view; this one answers "how is it now")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, collections.deque] = {}

    def observe(self, model: str, seconds: float) -> None:
        with self._lock:
            self._data.setdefault(model, collections.deque(maxlen=WINDOW)).append(seconds)

    def collect(self):
        g = GaugeMetricFamily("appliance_runtime_request_latency_window_seconds",
                              f"Request latency quantiles over the latest {WINDOW} requests",
                              labels=["model", "quantile"])
        with self._lock:
            snap = {m: np.fromiter(d, float) for m, d in self._data.items() if d}
        for model, arr in sorted(snap.items()):
            for q, v in zip(QUANTILES, np.quantile(arr, QUANTILES)):
                g.add_metric([model, str(q)], float(v))
        yield g


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("appliance_runtime_requests", "Prediction requests by outcome",
                                ["model", "code"], registry=r)
        self.latency = Histogram("appliance_runtime_request_latency_seconds",
                                 "Prediction request latency (parse, queue, invoke, encode)",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.invoke_seconds = Histogram("appliance_runtime_invoke_seconds", "Interpreter invoke time",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inline_invokes = Counter("appliance_runtime_inline_invokes",
                                      "Invokes run on the event loop thread (daemon otherwise idle)",
                                      ["model"], registry=r)
        self.batch_size = Histogram("appliance_runtime_batch_rows", "Rows per interpreter invoke",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("appliance_runtime_queue_depth", "Requests waiting for a batch",
                                 ["model"], registry=r)
        self.load_seconds = Gauge("appliance_runtime_model_load_seconds",
                                  "Time to build and warm up (one invoke each) the interpreter pool of the served version",
                                  ["model"], registry=r)
        self.model_ready = Gauge("appliance_runtime_model_ready", "1 if the model is served",
                                 ["model"], registry=r)
        self.window = _LatencyWindow()
        r.register(self.window)
        self.reloads = Counter("appliance_runtime_model_reloads", "Model versions swapped in",
                               ["model"], registry=r)
        # labels() costs a few microseconds (lock, tuple, dict): the per-request metrics keep
        # their children here. Bounded: the server labels unknown names "_unknown".
        self._count_children: dict[tuple[str, int], object] = {}
        self._latency_children: dict[str, object] = {}

    def count(self, model: str, status: int) -> None:
        c = self._count_children.get((model, status))
        if c is None:
            c = self._count_children[(model, status)] = self.requests.labels(model, str(status))
        c.inc()

    def observe_latency(self, model: str, seconds: float) -> None:
        h = self._latency_children.get(model)
        if h is None:
            h = self._latency_children[model] = self.latency.labels(model)
        h.observe(seconds)
        self.window.observe(model, seconds)
