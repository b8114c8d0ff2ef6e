"""Prometheus metrics, defined once. Any layer may update them (no web imports here).

Label values come from closed sets only: route templates, registry model names, registered method
names, HTTP verbs or ``other``, job tasks and states (``JOB_TASKS``, ``JOB_OUTCOMES``).

Each app instance gets its own ``CollectorRegistry`` so tests can build many apps in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# jobs run for seconds to hours
JOB_BUCKETS = (
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
)
#: ``saliency_job_duration_seconds``'s ``task`` and ``state`` label values
JOB_TASKS = ("explain", "evaluate")
JOB_OUTCOMES = ("succeeded", "failed", "stopped")  # stopped: cancelled, re-queued or shut down


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
        self.compute = Histogram(
            "saliency_compute_seconds",
            "Engine time of one explanation call (a batch of synchronous requests, or a chunk of a "
            "job), in seconds",
            ["model", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.job_duration = Histogram(
            "saliency_job_duration_seconds",
            "Jobs from start to their outcome, in seconds",
            ["task", "state"],
            buckets=JOB_BUCKETS,
            registry=r,
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
