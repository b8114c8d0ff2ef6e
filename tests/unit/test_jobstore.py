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

from service.errors import JobExpired, JobNotFinished, JobNotFound, Overloaded, RateLimited
from service.explainers import ExplainParams, Explanation
from service.imaging.geometry import make_geometry
from service.runtime.jobs.redis_store import RedisJobStore
from service.runtime.jobs.result import JobResult, concat, decode, encode, encoded_size
from service.runtime.jobs.store import (
    JobRecord,
    JobSpec,
    Limits,
    MemoryJobStore,
    error_class,
    new_job_id,
    tombstone_s,
)

RETENTION_S = 60
LIMITS = Limits.only_queue(10)


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
    yield request.getfixturevalue("redis_store")


@pytest.fixture()
def redis_store(redis_url: str) -> Iterator[RedisJobStore]:
    """A Redis store in a namespace of its own, dropped afterwards (for what only Redis does)."""
    s = RedisJobStore(
        redis_url, namespace=f"test-{uuid.uuid4().hex[:8]}", retention_s=RETENTION_S, active_ttl_s=3600
    )
    try:
        yield s
    finally:
        for key in s.redis.scan_iter(match=f"{s.ns}:*"):
            s.redis.delete(key)
        s.close()


def make_record(images: int = 2, *, owner: str | None = None, keep_inputs: bool = False) -> JobRecord:
    spec = JobSpec(
        model="tiny",
        method="integrated_gradients",
        params={"steps": 8, "seed": 5},
        targets=[3],
        top_k=1,
        images=images,
        keep_inputs=keep_inputs,
        options={"colormap": "viridis"},
    )
    return JobRecord(id=new_job_id(), status="queued", spec=spec, created_at=time.time(), owner=owner)


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
        store.redis.zadd(store._global("expiry"), {job_id: 0}, xx=True)  # its deadline has passed


# ------------------------------------------------------------------------------------------------
# the contract
# ------------------------------------------------------------------------------------------------
def test_create_get_and_inputs_in_order(store: Any) -> None:
    record = make_record()
    images = [b"\x89PNG first \x00\xff", b"second" * 1000]
    store.create(record, images, limits=LIMITS)
    got = store.get(record.id)
    assert got.status == "queued" and got.progress == 0.0 and got.attempts == 0
    assert got.spec == record.spec and got.created_at > 0
    assert got.started_at is None and got.finished_at is None and got.error is None
    assert store.inputs(record.id) == images
    assert store.counts() == {"queued": 1, "running": 0}


def test_queue_bound(store: Any) -> None:
    first, second, third = make_record(), make_record(), make_record()
    store.create(first, [b"a"], limits=Limits.only_queue(2))
    store.create(second, [b"b"], limits=Limits.only_queue(2))
    with pytest.raises(Overloaded) as info:
        store.create(third, [b"c"], limits=Limits.only_queue(2))
    assert info.value.retry_after >= 1
    with pytest.raises(JobNotFound):
        store.get(third.id)
    assert store.start(first.id, "w") is not None  # running jobs do not count against the bound
    store.create(third, [b"c"], limits=Limits.only_queue(2))
    assert store.counts() == {"queued": 2, "running": 1}


def test_start_is_compare_and_set_and_progress_needs_the_lease(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a", b"b"], limits=LIMITS)
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
    record = make_record(keep_inputs=True)
    store.create(record, [b"a", b"b"], limits=LIMITS)
    lease = store.start(record.id, "w")
    with pytest.raises(JobNotFinished):
        store.result(record.id)
    blob = bytes(range(256)) * 10
    assert not store.finish(record.id, "stale-lease", "succeeded", result=b"x")
    assert store.finish(record.id, lease, "succeeded", result=blob)
    done = store.get(record.id)
    assert done.status == "succeeded" and done.progress == 1.0 and done.finished_at is not None
    assert store.result(record.id) == blob
    assert store.inputs(record.id) == [b"a", b"b"]  # kept for overlays (keep_inputs)
    assert not store.finish(record.id, lease, "failed", error={"code": "x"})
    assert store.get(record.id).status == "succeeded"
    assert store.counts() == {"queued": 0, "running": 0}


def test_finish_failed_keeps_the_problem(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a"], limits=LIMITS)
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
    store.create(record, [b"a"], limits=LIMITS)
    cancelled = store.cancel(record.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert store.start(record.id, "w") is None
    assert store.counts() == {"queued": 0, "running": 0}


def test_cancel_running_takes_the_job_from_its_worker(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a"], limits=LIMITS)
    lease = store.start(record.id, "w")
    assert store.cancel(record.id).status == "cancelled"
    assert not store.progress(record.id, lease, 0.7)  # the worker learns at its next chunk
    assert not store.finish(record.id, lease, "succeeded", result=b"late")
    assert store.get(record.id).status == "cancelled"
    with pytest.raises(JobNotFinished):
        store.result(record.id)


def test_cancel_finished_changes_nothing(store: Any) -> None:
    record = make_record()
    store.create(record, [b"a"], limits=LIMITS)
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
    record = make_record(keep_inputs=True)
    store.create(record, [b"a"], limits=LIMITS)
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
    store.create(record, [b"a"], limits=LIMITS)
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


def sizes(store: Any) -> tuple[int, int]:
    """The store's own accounting: jobs kept and bytes held."""
    used: tuple[int, int] = store.usage()
    return used


def succeed(
    store: Any, record: JobRecord, inputs: list[bytes], result: bytes, limits: Limits = LIMITS
) -> None:
    store.create(record, inputs, limits=limits)
    lease = store.start(record.id, "w")
    assert store.finish(record.id, lease, "succeeded", result=result)


# ------------------------------------------------------------------------------------------------
# owners
# ------------------------------------------------------------------------------------------------
def test_another_owners_job_reads_as_an_unknown_id(store: Any) -> None:
    record = make_record(owner="alice", keep_inputs=True)
    succeed(store, record, [b"a", b"b"], b"r")
    assert store.get(record.id, owner="alice").owner == "alice"
    assert store.result(record.id, owner="alice") == b"r"
    assert store.inputs(record.id, owner="alice") == [b"a", b"b"]
    assert store.get(record.id).owner == "alice"  # the worker's and the maintenance's view
    unknown = new_job_id()
    for owner in ("bob", None):
        for call in (store.get, store.cancel, store.result, store.inputs):
            with pytest.raises(JobNotFound) as theirs:
                call(record.id, owner=owner)
            with pytest.raises(JobNotFound) as nobody:
                call(unknown, owner=owner)
            assert theirs.value.message == nobody.value.message.replace(unknown, record.id)
    assert store.get(record.id, owner="alice").status == "succeeded"  # bob's cancel changed nothing
    # once expired: 410 for its owner, still 404 for anyone else
    expire(store, record.id)
    with pytest.raises(JobExpired):
        store.get(record.id, owner="alice")
    with pytest.raises(JobNotFound):
        store.get(record.id, owner="bob")


def test_an_owner_may_have_so_many_active_jobs(store: Any) -> None:
    limits = Limits(queued=100, jobs=100, bytes=10**9, per_owner=2)
    first, second = make_record(owner="alice"), make_record(owner="alice")
    store.create(first, [b"a"], limits=limits)
    store.create(second, [b"a"], limits=limits)
    store.start(second.id, "w")  # running counts as well as queued
    third = make_record(owner="alice")
    with pytest.raises(RateLimited) as info:
        store.create(third, [b"a"], limits=limits)
    assert info.value.retry_after >= 1 and "2 jobs" in info.value.message
    with pytest.raises(JobNotFound):
        store.get(third.id)
    store.create(make_record(owner="bob"), [b"b"], limits=limits)  # others are not held up
    for _ in range(3):
        store.create(make_record(owner=None), [b"n"], limits=limits)  # no keys: no per-owner bound
    store.cancel(first.id)  # a finished job frees its place
    store.create(third, [b"a"], limits=limits)
    if isinstance(store, RedisJobStore):
        key = store.owner_key("alice")
        assert {m.decode() for m in store.redis.zrange(key, 0, -1)} == {second.id, third.id}
        assert 0 < store.redis.ttl(key) <= store.active_ttl_s
        # an entry whose job's keys have expired (its TTL ran out unfinished) leaks no place
        store.redis.zadd(key, {second.id: 0})
        store.create(make_record(owner="alice"), [b"a"], limits=limits)


# ------------------------------------------------------------------------------------------------
# bounds of the store
# ------------------------------------------------------------------------------------------------
def test_the_store_is_bounded_in_jobs_of_any_state(store: Any) -> None:
    limits = Limits(queued=100, jobs=2, bytes=10**9, per_owner=100)
    done = make_record()
    succeed(store, done, [b"a"], b"r", limits)
    store.create(make_record(), [b"b"], limits=limits)
    with pytest.raises(Overloaded) as info:
        store.create(make_record(), [b"c"], limits=limits)  # finished jobs count until they expire
    assert info.value.retry_after >= 1 and "2 jobs" in info.value.message
    assert sizes(store)[0] == 2
    expire(store, done.id)
    store.create(make_record(), [b"c"], limits=limits)
    assert sizes(store)[0] == 2


def test_the_store_is_bounded_in_bytes_and_drops_inputs_it_no_longer_needs(store: Any) -> None:
    limits = Limits(queued=100, jobs=100, bytes=1000, per_owner=100)
    plain, overlay = make_record(), make_record(keep_inputs=True)
    store.create(plain, [b"x" * 300, b"y" * 100], limits=limits, reserve=200)
    assert sizes(store) == (1, 600)  # the inputs and the reserved result
    with pytest.raises(Overloaded) as info:
        store.create(make_record(), [b"z" * 300], limits=limits, reserve=200)
    assert "bytes" in info.value.message and info.value.retry_after >= 1
    lease = store.start(plain.id, "w")
    assert store.finish(plain.id, lease, "succeeded", result=b"r" * 50)
    assert store.inputs(plain.id) == []  # dropped: only overlays draw on them
    assert sizes(store) == (1, 50)
    succeed(store, overlay, [b"o" * 100], b"r" * 70, limits)
    assert store.inputs(overlay.id) == [b"o" * 100]
    assert sizes(store) == (2, 220)
    failed = make_record(keep_inputs=True)
    store.create(failed, [b"f" * 500], limits=limits)
    lease = store.start(failed.id, "w")
    assert store.finish(failed.id, lease, "failed", error={"code": "x"})
    assert sizes(store) == (3, 220)
    cancelled = make_record()
    store.create(cancelled, [b"c" * 700], limits=limits, reserve=10)
    assert sizes(store) == (4, 930)
    store.cancel(cancelled.id)
    assert sizes(store) == (4, 220)
    for job in (plain, overlay, failed, cancelled):
        expire(store, job.id)
    assert sizes(store) == (0, 0)


def test_heartbeats_renew_the_expiry_of_a_running_job(redis_store: RedisJobStore) -> None:
    """A job running longer than its safety TTL must not vanish (memory jobs never expire unfinished)."""
    store = redis_store
    record = make_record()
    store.create(record, [b"a"], limits=LIMITS)
    lease = store.start(record.id, "w")
    job, inputs = store._keys(record.id, "job", "inputs")
    for key in (job, inputs):
        store.redis.expire(key, 5)  # as if the job had run almost as long as its safety TTL
    assert store.progress(record.id, lease, None)
    for key in (job, inputs):
        assert store.redis.ttl(key) > store.active_ttl_s - 10
    store.redis.expire(job, 5)
    assert store.progress(record.id, lease, 0.5)
    assert store.redis.ttl(job) > store.active_ttl_s - 10


def test_a_queued_job_nobody_took_is_due_for_another_message(redis_store: RedisJobStore) -> None:
    """Celery only: a message can be lost (the local pool's queue cannot lose a job)."""
    store = redis_store
    record, other = make_record(), make_record()
    store.create(record, [b"a"], limits=LIMITS)
    store.create(other, [b"b"], limits=LIMITS)
    assert store.due_for_dispatch() == []  # a fresh job waits redispatch_s first
    queued = store._global("queued")
    store.redis.zadd(queued, {record.id: 0})  # as if it had waited past its due time
    assert store.due_for_dispatch() == [record.id]
    assert store.redispatched(record.id) == 1
    assert store.due_for_dispatch() == [] and store.redispatched(record.id) == 0
    wait = store.redis.zscore(queued, record.id) - store._now()
    assert 1.9 * store.redispatch_s < wait <= 2 * store.redispatch_s  # twice as long the next time
    store.redis.zadd(queued, {record.id: 0})
    assert store.redispatched(record.id) == 2
    assert store.counts()["queued"] == 2
    store.start(record.id, "w")
    store.redis.zadd(queued, {other.id: 0})
    store.cancel(other.id)
    assert store.due_for_dispatch() == [] and store.counts() == {"queued": 0, "running": 1}


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
        blob = encode(JobResult(whole, geometries, 12.5), keep_attributions=keep)
        assert len(blob) <= encoded_size(3, 2, (3, 8, 8), keep_attributions=keep)
        back = decode(blob)
        e = back.explanation
        assert e.method == whole.method and e.params == whole.params and e.signed
        for name in ("maps", "targets", "scores", "logits", "completeness_delta"):
            assert torch.equal(getattr(e, name), getattr(whole, name))
        assert (e.attributions is not None) == keep
        if keep:
            assert torch.equal(e.attributions, whole.attributions)  # type: ignore[arg-type]
        assert back.geometries == geometries and back.elapsed_ms == 12.5


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "size"),
    [(1, 1, (3, 64, 64)), (4, 3, (3, 224, 224)), (64, 10, (3, 32, 32)), (2, 5, (1, 96, 128))],
)
def test_the_result_estimate_bounds_the_encoding_closely(
    n: int, k: int, size: tuple[int, int, int], keep: bool
) -> None:
    """The size submission refuses a job by is at least the real one, and close to it (so the
    limit refuses what it says); a long layer name and big geometries included."""
    c, h, w = size
    g = torch.Generator().manual_seed(n)
    explanation = Explanation(
        method="integrated_gradients",
        params=ExplainParams(steps=8, seed=5, layer="features.denseblock4.denselayer16.conv2"),
        maps=torch.randn(n, k, h, w, generator=g),
        targets=torch.randint(0, 1000, (n, k), generator=g),
        scores=torch.rand(n, k, generator=g),
        logits=torch.randn(n, k, generator=g),
        attributions=torch.randn(n, k, c, h, w, generator=g),
        completeness_delta=torch.randn(n, k, generator=g),
        signed=True,
    )
    geometries = [make_geometry(12_345 + i, 6_789, size, "center_crop") for i in range(n)]
    real = len(encode(JobResult(explanation, geometries, 123456.75), keep_attributions=keep))
    estimate = encoded_size(n, k, size, keep_attributions=keep)
    assert real <= estimate <= 1.1 * real
