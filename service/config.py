"""The one settings object. Read once (``get_settings``) at start-up, validated, then injected."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; environment variables use the ``SALIENCY_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="SALIENCY_", extra="ignore")

    # --- serving ---------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = Field(
        "text",
        description="json: one JSON object per log line (the container image's default); text: for a terminal",
    )
    worker_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Celery workers serve Prometheus /metrics (compute and job durations) on this port",
    )

    # --- access ----------------------------------------------------------------------------------
    api_keys: str | None = Field(
        None,
        description="comma-separated API keys; set (or api_keys_file) → every /v1 route needs one",
        repr=False,
    )
    api_keys_file: Path | None = Field(None, description="a file of API keys, one per line (# comments)")
    metrics_require_key: bool = Field(False, description="/metrics needs an API key too")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty: none")
    max_sync_per_key: int = Field(
        8, ge=1, description="concurrent synchronous requests per API key before 429"
    )
    max_jobs_per_key: int = Field(20, ge=1, description="queued or running jobs per API key before 429")

    # --- models ----------------------------------------------------------------------------------
    models_config: Path | None = Field(
        None, description="TOML file with [[models]] tables; unset: the builtin efficientnet_lite0."
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="precision of requests that leave it unset: bf16 runs them in bf16 where the "
        "method is offered in bf16 and bf16 pays on the device (CUDA, a CPU with AMX), else in "
        "fp32 (the request parameter's auto); a request's precision overrides it",
    )
    warmup: bool = True
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; unset: torch's default"
    )
    retain_heap: bool = Field(
        True,
        description="serve/worker: glibc malloc keeps freed memory for the next call instead of "
        "unmapping it (no page faults per call; resident memory stays at its peak)",
    )

    # --- images ----------------------------------------------------------------------------------
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1024, description="decoded pixels (bomb guard)")
    min_image_size: int = Field(8, ge=1, description="smallest accepted width or height in pixels")
    overlay_background: tuple[int, int, int] = (255, 255, 255)

    # --- synchronous explain -----------------------------------------------------------------------
    request_timeout_s: float = Field(60.0, gt=0)
    max_sync_passes: int = Field(
        4096, ge=1, description="images × targets × steps × samples above this → 422, use /v1/jobs"
    )
    default_batch_size: int = Field(32, ge=1, le=1024)
    batch_memory_bytes: int = Field(
        8 * 1024**3,
        ge=16 * 1024**2,
        description="activation memory one engine call may use per model: batch_size is clamped to it",
    )
    prepared_copies: int = Field(
        4,
        ge=1,
        le=64,
        description="private attribution copies kept per model (one per CAM layer in use; LRU)",
    )
    max_response_bytes: int = Field(
        128 * 1024**2,
        ge=64 * 1024,
        description="estimated response bodies above this → 422 response-too-large",
    )
    max_sync_images: int = Field(
        16,
        ge=1,
        le=1024,
        description="images one synchronous request may carry (KServe instances, TorchServe data "
        "parts); together they hold at most max_image_pixels",
    )
    max_json_depth: int = Field(32, ge=2, le=1000, description="nesting allowed in a JSON request body")
    max_form_fields: int = Field(256, ge=16, le=100_000, description="form or JSON fields per request")
    batching: bool = True
    batch_max_delay_ms: float = Field(5.0, ge=0)
    batch_max_size: int = Field(16, ge=1)
    sync_queue_size: int = Field(64, ge=1, description="waiting synchronous requests per model before 503")

    # --- jobs ------------------------------------------------------------------------------------
    jobs_backend: Literal["local", "celery"] = "local"
    broker_url: str = "redis://127.0.0.1:6379/0"
    job_queue_size: int = Field(100, ge=1)
    job_retention_s: int = Field(3600, ge=1)
    job_max_images: int = Field(256, ge=1)
    job_max_passes: int = Field(
        2_000_000, ge=1, description="images × targets × passes of one job above this → 422"
    )
    job_max_result_bytes: int = Field(
        256 * 1024**2,
        ge=1024,
        description="a job whose stored result would exceed this → 422 (≤ Redis' 512 MB)",
    )
    job_store_max_jobs: int = Field(10_000, ge=1, description="jobs kept (any state) before 503")
    job_store_max_bytes: int = Field(
        4 * 1024**3, ge=1024**2, description="bytes of inputs and results kept before new jobs get 503"
    )
    job_visibility_timeout_s: int = Field(
        6 * 3600, ge=60, description="Celery/Redis: unacked messages are redelivered after this"
    )
    job_lease_s: float = Field(
        30.0, ge=1.0, description="a running job whose worker sent no heartbeat for this long is re-queued"
    )
    job_max_attempts: int = Field(
        2, ge=1, description="deliveries of a job whose worker died before it is marked failed"
    )
    redis_namespace: str = Field(
        "saliency", pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description="prefix of job keys and the Celery queue"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        v = value.strip().lower()
        if v in {"auto", "cpu", "cuda"}:
            return v
        if v.startswith("cuda:") and v[5:].isdigit():
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    def engine_defaults(self) -> dict[str, object]:
        """The engine parameters the server sets: those a client cannot set, and the defaults of
        those it may leave unset (``server_default`` in ``ExplainParams``)."""
        return {
            "batch_size": self.default_batch_size,
            "precision": "auto" if self.precision == "bf16" else "fp32",
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
