"""The server's Prometheus metrics, in a registry of their own (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Requests by status, queue depth, batch size, time to first token, latency, tokens generated."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "Completion requests by HTTP status.", ["status"], registry=r)
        self.queue_depth = Gauge("lmforge_queue_depth", "Requests queued or running.", registry=r)
        self.batch_size = Histogram(
            "lmforge_batch_size", "Sequences per decode step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "lmforge_time_to_first_token_seconds",
            "From request to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "lmforge_request_latency_seconds", "From request to its last token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter(
            "lmforge_generated_tokens", "Tokens generated (rate() gives tokens per second).", registry=r
        )

    def render(self, queue_depth: int) -> bytes:
        self.queue_depth.set(queue_depth)
        return generate_latest(self.registry)
