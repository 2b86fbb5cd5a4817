"""Prometheus metrics of one engine, on its own CollectorRegistry (no module globals: tests make many).

The step loop, the registry and the service record into an `EngineMetrics`; `GET /metrics` renders it:

    metrics = EngineMetrics()
    metrics.step_seconds.observe(0.004)
    text = metrics.render()   # Prometheus text format
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Steps of a small RNN take ~0.1–50 ms; requests ~10 ms – 10 s.
_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("yinshi_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running_requests = Gauge("yinshi_running_requests", "Requests in the batch", registry=r)
        self.running_rows = Gauge("yinshi_running_rows", "Batch rows in use (a beam request takes beam_width)",
                                  registry=r)
        self.batch_rows = Histogram("yinshi_batch_rows", "Rows per step, before padding", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.step_seconds = Histogram("yinshi_step_seconds", "Wall time of one engine step (all models)",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.request_seconds = Histogram("yinshi_request_seconds", "Request latency, admission to poem",
                                         ["mode"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("yinshi_tokens", "Tokens decoded (rows × steps, padding excluded)", registry=r)
        self.tokens_per_second = Gauge("yinshi_tokens_per_second", "Tokens decoded per second over the last ~1 s",
                                       registry=r)
        self.requests = Counter("yinshi_requests", "Requests by outcome", ["outcome"], registry=r)
        self.rejections = Counter("yinshi_rejections", "Requests refused because the queue was full", registry=r)
        self.swaps = Counter("yinshi_model_swaps", "New model versions swapped in", ["model"], registry=r)
        self.failed_validations = Counter("yinshi_failed_validations",
                                          "Published versions refused by validation", ["model"], registry=r)
        self.model_info = Gauge("yinshi_model_serving", "1 for the version each model serves",
                                ["model", "version"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
