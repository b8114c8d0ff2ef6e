"""Prometheus metrics, defined once. Any layer may update them (no web imports here).

Each app instance gets its own ``CollectorRegistry`` so tests can build many apps in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.request_duration = Histogram(
            "saliency_http_request_duration_seconds",
            "HTTP request duration in seconds",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "saliency_queue_wait_seconds",
            "Time work waited before a worker started it, in seconds",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "saliency_batch_size",
            "Images per batched engine call",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.explanations = Counter(
            "saliency_explanations_total", "Explanations computed", ["model", "method"], registry=r
        )
        self.jobs = Gauge("saliency_jobs", "Jobs by state", ["state"], registry=r)
        self.device_memory = Gauge(
            "saliency_device_memory_bytes", "Allocated device memory in bytes", ["device"], registry=r
        )

    def render(self) -> bytes:
        """The Prometheus text exposition, with device memory sampled now."""
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                self.device_memory.labels(device=f"cuda:{i}").set(torch.cuda.memory_allocated(i))
        return generate_latest(self.registry)
