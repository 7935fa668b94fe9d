"""Prometheus metrics of one server instance (own registry, so tests can run several)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Fine buckets at the low end: tiny models answer in well under a millisecond, and the
# p50/p95/p99 that histogram_quantile() derives are only as good as the buckets.
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                   0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


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
        self.batch_size = Histogram("appliance_runtime_batch_rows", "Rows per interpreter invoke",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("appliance_runtime_queue_depth", "Requests waiting for a batch",
                                 ["model"], registry=r)
        self.load_seconds = Gauge("appliance_runtime_model_load_seconds",
                                  "Time to build the interpreter pool of the served version",
                                  ["model"], registry=r)
        self.model_ready = Gauge("appliance_runtime_model_ready", "1 if the model is served",
                                 ["model"], registry=r)
        self.reloads = Counter("appliance_runtime_model_reloads", "Model versions swapped in",
                               ["model"], registry=r)
