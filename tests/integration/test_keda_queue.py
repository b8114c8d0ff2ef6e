"""The Redis list that KEDA's ScaledObject (deploy/kubernetes/components/keda) measures is where
queued jobs wait: its length follows the jobs sent to the Celery queue."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import yaml

from service.config import Settings
from service.runtime.jobs.celery_app import enqueue, make_celery

pytestmark = pytest.mark.slow

SCALED_OBJECT = Path(__file__).resolve().parents[2] / "deploy/kubernetes/components/keda/scaledobject.yaml"
DB = 15  # a database of its own, so the manifest's list name is used as it is


def test_keda_list_length_counts_the_queued_jobs(redis_url: str) -> None:
    trigger = yaml.safe_load(SCALED_OBJECT.read_text())["spec"]["triggers"][0]["metadata"]
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    settings = Settings(jobs_backend="celery", broker_url=url)  # the manifests' namespace: the default
    client = redis.Redis.from_url(url)
    client.flushdb()
    app = make_celery(settings)
    try:
        assert client.llen(trigger["listName"]) == 0
        for n in range(3):
            enqueue(app, settings, f"job-{n}")
        assert client.llen(trigger["listName"]) == 3
    finally:
        app.close()
        client.flushdb()
        client.close()
