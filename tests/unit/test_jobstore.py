"""The job store contract, run against both stores: in memory and in a real Redis server.

Redis: ``SALIENCY_TEST_REDIS_URL`` (set by ``.ci/run``); without it, a ``redis-server`` found on
the PATH is started on a free port for this module. ``SALIENCY_REQUIRE_REDIS=1`` turns a missing
or unreachable Redis into a failure, never a skip. Each test uses a namespace of its own.

Time is never waited for: the memory store takes a clock; in Redis, an old heartbeat is written
into the running set directly and an expired job is one whose keys are gone (as their TTL does).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import redis_server

from service.errors import JobExpired, JobNotFinished, JobNotFound, Overloaded
from service.explainers import ExplainParams, Explanation
from service.imaging.geometry import make_geometry
from service.runtime.jobs.redis_store import RedisJobStore
from service.runtime.jobs.result import JobResult, concat, decode, encode
from service.runtime.jobs.store import (
    JobRecord,
    JobSpec,
    MemoryJobStore,
    error_class,
    new_job_id,
    tombstone_s,
)

RETENTION_S = 60


# ------------------------------------------------------------------------------------------------
# a Redis server
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryJobStore(RETENTION_S, clock=Clock())
        return
    url = request.getfixturevalue("redis_url")
    s = RedisJobStore(
        url, namespace=f"test-{uuid.uuid4().hex[:8]}", retention_s=RETENTION_S, active_ttl_s=3600
    )
    try:
        yield s
    finally:
        for key in s.redis.scan_iter(match=f"{s.ns}:*"):
            s.redis.delete(key)
        s.close()


def make_record(images: int = 2) -> JobRecord:
    spec = JobSpec(
        model="tiny",
        method="integrated_gradients",
        params={"steps": 8, "seed": 5},
        targets=[3],
        top_k=1,
        images=images,
        options={"colormap": "viridis"},
    )
    return JobRecord(id=new_job_id(), status="queued", spec=spec, created_at=time.time())


def make_old_heartbeat(store: Any, job_id: str) -> None:
    """As if the worker's last heartbeat was long ago."""
    if isinstance(store, MemoryJobStore):
        store._entries[job_id].heartbeat = store.clock() - 10_000
    else:
        store.redis.zadd(store._global("running"), {job_id: 0})


def expire(store: Any, job_id: str) -> None:
    """As if the finished job's retention time had passed."""
    if isinstance(store, MemoryJobStore):
        store.clock.now += RETENTION_S + 1  # type: ignore[attr-defined]
    else:
        job, result, inputs = store._keys(job_id, "job", "result", "inputs")
        store.redis.delete(job, result, inputs)  # what their TTL does; the tombstone outlives them


# ------------------------------------------------------------------------------------------------
# the contract
# ------------------------------------------------------------------------------------------------
def test_create_get_and_inputs_in_order(store: Any) -> None:
    record = make_record()
    images = [b"\x89PNG first \x00\xff", b"second" * 1000]
    store.create(record, images, max_queued=10)
    got = store.get(record.id)
    assert got.status == "queued" and got.progress == 0.0 and got.attempts == 0
    assert got.spec == record.spec and got.created_at > 0
    assert got.started_at is None and got.finished_at is None and got.error is None
    assert store.inputs(record.id) == images
    assert store.counts() == {"queued": 1, "running": 0}


def test_queue_bound(store: Any) -> None:
    first, second, third = make_record(), make_record(), make_record()
    store.create(first, [b"a"], max_queued=2)
    store.create(second, [b"b"], max_queued=2)
    with pytest.raises(Overloaded) as info:
        store.create(third, [b"c"], max_queued=2)
    assert info.value.retry_after >= 1
    with pytest.raises(JobNotFound):
        store.get(third.id)
    assert store.start(first.id, "w") is not None  # running jobs do not count against the bound
    store.create(third, [b"c"], max_queued=2)
    assert store.counts() == {"queued": 2, "running": 1}


def test_start_is_compare_and_set_and_progress_needs_the_lease(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a", b"b"], max_queued=10)
    lease = store.start(record.id, "worker-1")
    assert lease is not None
    assert store.start(record.id, "worker-2") is None
    running = store.get(record.id)
    assert running.status == "running" and running.attempts == 1 and running.worker == "worker-1"
    assert running.started_at is not None
    assert store.progress(record.id, lease, 0.25)
    assert store.progress(record.id, lease, 0.5)
    assert store.progress(record.id, lease, 0.4)  # never moves backwards
    assert store.progress(record.id, lease, None)  # a heartbeat only
    assert store.get(record.id).progress == pytest.approx(0.5)
    assert not store.progress(record.id, "not-the-lease", 0.9)
    assert store.get(record.id).progress == pytest.approx(0.5)


def test_finish_succeeded_keeps_result_and_inputs(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a", b"b"], max_queued=10)
    lease = store.start(record.id, "w")
    with pytest.raises(JobNotFinished):
        store.result(record.id)
    blob = bytes(range(256)) * 10
    assert not store.finish(record.id, "stale-lease", "succeeded", result=b"x")
    assert store.finish(record.id, lease, "succeeded", result=blob)
    done = store.get(record.id)
    assert done.status == "succeeded" and done.progress == 1.0 and done.finished_at is not None
    assert store.result(record.id) == blob
    assert store.inputs(record.id) == [b"a", b"b"]  # kept for overlays
    assert not store.finish(record.id, lease, "failed", error={"code": "x"})
    assert store.get(record.id).status == "succeeded"
    assert store.counts() == {"queued": 0, "running": 0}


def test_finish_failed_keeps_the_problem(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a"], max_queued=10)
    lease = store.start(record.id, "w")
    error = {"code": "invalid-parameter", "title": "Invalid parameter", "detail": "bad"}
    assert store.finish(record.id, lease, "failed", error=error)
    failed = store.get(record.id)
    assert failed.status == "failed" and failed.error == error
    with pytest.raises(JobNotFinished):
        store.result(record.id)
    assert store.inputs(record.id) == []


def test_cancel_queued_never_starts(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a"], max_queued=10)
    cancelled = store.cancel(record.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert store.start(record.id, "w") is None
    assert store.counts() == {"queued": 0, "running": 0}


def test_cancel_running_takes_the_job_from_its_worker(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a"], max_queued=10)
    lease = store.start(record.id, "w")
    assert store.cancel(record.id).status == "cancelled"
    assert not store.progress(record.id, lease, 0.7)  # the worker learns at its next chunk
    assert not store.finish(record.id, lease, "succeeded", result=b"late")
    assert store.get(record.id).status == "cancelled"
    with pytest.raises(JobNotFinished):
        store.result(record.id)


def test_cancel_finished_changes_nothing(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a"], max_queued=10)
    lease = store.start(record.id, "w")
    store.finish(record.id, lease, "succeeded", result=b"r")
    assert store.cancel(record.id).status == "succeeded"
    assert store.result(record.id) == b"r"


def test_unknown_and_malformed_ids(store: Any) -> None:
    for job_id in (new_job_id(), "nope", "0" * 31, "../" + "a" * 29):
        with pytest.raises(JobNotFound):
            store.get(job_id)
        with pytest.raises(JobNotFound):
            store.cancel(job_id)
        with pytest.raises(JobNotFound):
            store.result(job_id)


def test_expired_is_not_unknown(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a"], max_queued=10)
    lease = store.start(record.id, "w")
    store.finish(record.id, lease, "succeeded", result=b"r")
    if isinstance(store, RedisJobStore):
        job, result, inputs, tomb = store._keys(record.id, "job", "result", "inputs", "tomb")
        for key in (job, result, inputs):
            assert 0 < store.redis.ttl(key) <= RETENTION_S
        assert store.redis.ttl(tomb) > RETENTION_S
        assert store.redis.ttl(tomb) <= tombstone_s(RETENTION_S)
    expire(store, record.id)
    with pytest.raises(JobExpired):
        store.get(record.id)
    with pytest.raises(JobExpired):
        store.result(record.id)


def test_a_stale_running_job_is_requeued_then_failed(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a"], max_queued=10)
    first = store.start(record.id, "w1")
    assert store.stale(30) == []
    assert store.recover(record.id, 30, 2) is None  # fresh heartbeat: left alone
    make_old_heartbeat(store, record.id)
    assert store.stale(30) == [record.id]
    assert store.recover(record.id, 30, 2) == "requeued"
    requeued = store.get(record.id)
    assert requeued.status == "queued" and requeued.progress == 0.0 and requeued.attempts == 1
    assert store.inputs(record.id) == [b"a"]
    assert not store.progress(record.id, first, 0.5)  # the old worker lost the job
    second = store.start(record.id, "w2")
    assert second is not None and second != first
    assert store.get(record.id).attempts == 2
    make_old_heartbeat(store, record.id)
    assert store.recover(record.id, 30, 2) == "failed"
    failed = store.get(record.id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error["code"] == "worker-lost"
    assert (
        "stopped unexpectedly" in failed.error["detail"]
        and "attempt 2 of at most 2" in failed.error["detail"]
    )
    assert store.recover(record.id, 30, 2) is None
    assert store.counts() == {"queued": 0, "running": 0}


# ------------------------------------------------------------------------------------------------
# records, errors and results
# ------------------------------------------------------------------------------------------------
def test_spec_round_trips_through_json() -> None:
    spec = make_record().spec
    assert JobSpec.from_json(spec.to_json()) == spec
    params = JobSpec("m", "gradcam", {"layer": "x", "batch_size": 4}, None, 2, 1).explain_params()
    assert params == ExplainParams(layer="x", batch_size=4)


def test_error_codes_map_back_to_their_classes() -> None:
    assert error_class("job-expired") is JobExpired
    assert error_class("unknown-model").__name__ == "UnknownModel"
    assert error_class("no-such-code").__name__ == "SaliencyError"


def _explanation(n: int, seed: int) -> Explanation:
    g = torch.Generator().manual_seed(seed)
    return Explanation(
        method="integrated_gradients",
        params=ExplainParams(steps=8, seed=5),
        maps=torch.randn(n, 2, 8, 8, generator=g),
        targets=torch.randint(0, 10, (n, 2), generator=g),
        scores=torch.rand(n, 2, generator=g),
        logits=torch.randn(n, 2, generator=g),
        attributions=torch.randn(n, 2, 3, 8, 8, generator=g),
        completeness_delta=torch.randn(n, 2, generator=g),
        signed=True,
    )


def test_results_encode_and_decode_exactly() -> None:
    parts = [_explanation(2, 0), _explanation(1, 1)]
    whole = concat(parts)
    assert whole.maps.shape == (3, 2, 8, 8)
    assert torch.equal(whole.maps[2], parts[1].maps[0])
    geometries = [make_geometry(80 + i, 50, (3, 8, 8), "center_crop") for i in range(3)]
    for keep in (True, False):
        back = decode(encode(JobResult(whole, geometries, 12.5), keep_attributions=keep))
        e = back.explanation
        assert e.method == whole.method and e.params == whole.params and e.signed
        for name in ("maps", "targets", "scores", "logits", "completeness_delta"):
            assert torch.equal(getattr(e, name), getattr(whole, name))
        assert (e.attributions is not None) == keep
        if keep:
            assert torch.equal(e.attributions, whole.attributions)  # type: ignore[arg-type]
        assert back.geometries == geometries and back.elapsed_ms == 12.5
