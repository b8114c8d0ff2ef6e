"""Job records and the store that keeps them: in memory (local pool) or in Redis (Celery).

A job moves ``queued → running → succeeded | failed | cancelled`` (or ``queued → cancelled``).
Every change of state goes through the store and is a compare-and-set, so two processes never
both start a job, and a worker that lost its job (cancelled, or re-queued after its lease ran
out) learns so at its next chunk instead of overwriting the new state:

- ``start`` takes a queued job and hands back a *lease* token; ``progress``, ``heartbeat`` and
  ``finish`` succeed only while that lease is the job's current one.
- ``recover`` re-queues a running job whose heartbeat is older than the lease time (its worker
  died), or fails it with a clear error after ``max_attempts`` deliveries.
- A finished job is kept ``retention_s``; after that its id leaves a *tombstone* for a while
  longer, so an expired job answers 410 and an id that never existed 404.

The store also holds each job's input images (raw upload bytes, in upload order) and, on
success, its encoded result (``service.runtime.jobs.result``). Inputs are dropped as soon as a
job finishes, unless it keeps them to draw overlays (``JobSpec.keep_inputs``).

A job belongs to the API key that submitted it (``JobRecord.owner``): reads on a client's behalf
pass ``owner=`` and see another owner's job, live or expired, exactly as an id that never existed
(``JobNotFound``), so ids leak nothing. The worker and the maintenance loop read as ``ANY_OWNER``.

``create`` enforces every bound at once (``Limits``): queued jobs, jobs kept in any state, bytes
kept (inputs and results; a queued job reserves its estimated result) and active jobs per owner.
"""

from __future__ import annotations

import enum
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

from service.config import Settings
from service.errors import JobExpired, JobNotFinished, JobNotFound, Overloaded, RateLimited, SaliencyError
from service.explainers import ExplainParams, Targets

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: frozenset[str] = frozenset({"queued", "running"})
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
Recovery = Literal["requeued", "failed"]

_ID = re.compile(r"^[0-9a-f]{32}$")
MIN_TOMBSTONE_S = 24 * 3600
# seconds a client refused for a full store or its own job limit should wait
RETRY_AFTER_FULL_S = 5
RETRY_AFTER_OWNER_S = 10


class _AnyOwner(enum.Enum):
    ANY = "any"


ANY_OWNER = _AnyOwner.ANY  # the worker and the maintenance loop: every job is theirs to see
Owner = str | None | _AnyOwner


def visible(record_owner: str | None, owner: Owner) -> bool:
    """Whether a caller reading as ``owner`` may see a job that belongs to ``record_owner``."""
    return owner is ANY_OWNER or record_owner == owner


def not_found(job_id: str) -> JobNotFound:
    """The one error for an unknown id and for another owner's job: they must read the same."""
    return JobNotFound(f"no job with id {job_id!r}")


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_job_id(job_id: str) -> str:
    """``JobNotFound`` for anything that cannot be a job id (no store lookup for it)."""
    if not _ID.match(job_id):
        raise not_found(job_id)
    return job_id


def tombstone_s(retention_s: float) -> int:
    """How long an expired job's id is remembered (410 rather than 404)."""
    return int(max(MIN_TOMBSTONE_S, 10 * retention_s))


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    """What to compute: the engine call, applied to every image of the job."""

    model: str
    method: str
    params: dict[str, Any]  # ExplainParams.as_dict(), seed and layer resolved at submission
    targets: list[int] | None  # explicit targets for every image, or None for top_k
    top_k: int
    images: int
    keep_attributions: bool = False  # store the per-channel attributions too (reduction=none)
    keep_inputs: bool = False  # keep the uploads after success, to draw overlays (format=overlay)
    options: dict[str, Any] = field(default_factory=dict)  # the rendering parameters given at submission
    task: str = "explain"  # or "evaluate": per-image scores of ``methods`` (EvaluateParams in ``evaluate``)
    methods: list[str] | None = None  # task=evaluate: the methods evaluated (``method`` is the first)
    evaluate: dict[str, Any] | None = None  # task=evaluate: EvaluateParams.as_dict()

    def explain_params(self) -> ExplainParams:
        return ExplainParams(**self.params)

    def target_set(self) -> Targets:
        """The job's ``Targets`` over all of its images."""
        if self.targets is None:
            return Targets.top(self.top_k)
        return Targets.given([self.targets] * self.images)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class JobRecord:
    """A job's state as clients see it, plus the spec it runs."""

    id: str
    status: JobStatus
    spec: JobSpec
    created_at: float  # UNIX seconds
    progress: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    error: dict[str, Any] | None = None  # {"code", "title", "detail"}: a problem, never internals
    attempts: int = 0
    worker: str | None = None
    owner: str | None = None  # the submitting API key's id (``None`` without keys)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def with_(self, **changes: Any) -> JobRecord:
        return replace(self, **changes)


def error_info(exc: SaliencyError) -> dict[str, Any]:
    """The stored form of a job's failure: the domain error's code, title and message."""
    info: dict[str, Any] = {"code": exc.code, "title": exc.title, "detail": exc.message}
    if exc.field is not None:
        info["field"] = exc.field
    return info


def error_class(code: str) -> type[SaliencyError]:
    """The domain error class with this ``code`` (``SaliencyError`` if none has it)."""
    stack: list[type[SaliencyError]] = [SaliencyError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return SaliencyError


# ------------------------------------------------------------------------------------------------
# the store interface
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """The bounds ``create`` enforces, checked together with the insert so no two submissions both
    take the last place."""

    queued: int  # queued jobs (``Overloaded``)
    jobs: int  # jobs kept in any state, finished ones until they expire (``Overloaded``)
    bytes: int  # inputs and results kept, estimated results of unfinished jobs included (``Overloaded``)
    per_owner: int  # queued + running jobs of one owner (``RateLimited``; not applied to ``None``)

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            queued=settings.job_queue_size,
            jobs=settings.job_store_max_jobs,
            bytes=settings.job_store_max_bytes,
            per_owner=settings.max_jobs_per_key,
        )

    @classmethod
    def only_queue(cls, queued: int) -> Limits:
        """No bound but the queue's (tests, tools)."""
        return cls(queued=queued, jobs=2**62, bytes=2**62, per_owner=2**62)


def store_full(what: str) -> Overloaded:
    return Overloaded(f"the job store is full ({what}); retry later", retry_after=RETRY_AFTER_FULL_S)


def queue_full(queued: int) -> Overloaded:
    return Overloaded(f"{queued} jobs are already queued; retry later", retry_after=RETRY_AFTER_FULL_S)


def owner_busy(active: int) -> RateLimited:
    return RateLimited(
        f"this API key has {active} jobs queued or running, the most it may have; wait for one to "
        "finish (or cancel one) and retry",
        retry_after=RETRY_AFTER_OWNER_S,
    )


class JobStore(Protocol):
    """Where job records, inputs and results live. Every method is blocking and thread-safe."""

    retention_s: float

    def create(self, record: JobRecord, inputs: list[bytes], *, limits: Limits, reserve: int = 0) -> None:
        """Add a queued job holding ``inputs`` and ``reserve`` bytes for its result; ``Overloaded``
        when the queue or the store is full, ``RateLimited`` when its owner has too many active jobs."""

    def get(self, job_id: str, *, owner: Owner = ANY_OWNER) -> JobRecord:
        """The record; ``JobNotFound`` for an unknown id (or another owner's job), ``JobExpired``
        past retention."""

    def inputs(self, job_id: str, *, owner: Owner = ANY_OWNER) -> list[bytes]:
        """The job's images as uploaded (empty once the job has finished, unless it keeps them)."""

    def start(self, job_id: str, worker: str) -> str | None:
        """queued → running; the lease token, or ``None`` when the job is not queued (any more)."""

    def progress(self, job_id: str, lease: str, value: float | None) -> bool:
        """Record progress (``None``: a heartbeat only); ``False`` once the lease is lost."""

    def finish(
        self,
        job_id: str,
        lease: str,
        status: JobStatus,
        *,
        error: dict[str, Any] | None = None,
        result: bytes | None = None,
    ) -> bool:
        """running → a finished status; ``False`` (and no change) once the lease is lost."""

    def cancel(self, job_id: str, *, owner: Owner = ANY_OWNER) -> JobRecord:
        """Cancel a queued or running job (a finished one stays as it is); the record after."""

    def result(self, job_id: str, *, owner: Owner = ANY_OWNER) -> bytes:
        """The encoded result; ``JobNotFinished`` unless the job succeeded."""

    def stale(self, lease_s: float) -> list[str]:
        """Running jobs whose last heartbeat is older than ``lease_s``."""

    def recover(self, job_id: str, lease_s: float, max_attempts: int) -> Recovery | None:
        """Re-queue (or, after ``max_attempts`` starts, fail) a stale running job."""

    def counts(self) -> dict[str, int]:
        """Jobs queued and running."""

    def usage(self) -> tuple[int, int]:
        """Jobs kept (any state) and bytes held (inputs, results and reservations)."""

    def close(self) -> None: ...


def lost_worker_error(attempts: int | str, max_attempts: int) -> dict[str, Any]:
    """The failure of a job whose worker died on each of its ``max_attempts`` deliveries."""
    return {
        "code": "worker-lost",
        "title": "Worker lost",
        "detail": (
            f"the worker running this job stopped unexpectedly (attempt {attempts} of at most "
            f"{max_attempts}); submit the job again"
        ),
    }


# ------------------------------------------------------------------------------------------------
# in memory
# ------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    record: JobRecord
    inputs: list[bytes]
    result: bytes | None = None
    lease: str | None = None
    heartbeat: float = 0.0
    reserved: int = 0  # the estimated result, until the job finishes

    @property
    def size(self) -> int:
        held = sum(len(b) for b in self.inputs) + (len(self.result) if self.result is not None else 0)
        return held + self.reserved


class MemoryJobStore:
    """The local backend's store: a dict guarded by a lock. Jobs live as long as the process."""

    def __init__(self, retention_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self.retention_s = retention_s
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._tombstones: dict[str, tuple[float, str | None]] = {}  # id → (forget it at, owner)
        self._bytes = 0  # Σ entry sizes, kept up to date by ``_resize``
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def create(self, record: JobRecord, inputs: list[bytes], *, limits: Limits, reserve: int = 0) -> None:
        entry = _Entry(record.with_(status="queued"), list(inputs), reserved=reserve)
        with self._lock:
            self._expire(force=True)
            queued = sum(1 for e in self._entries.values() if e.record.status == "queued")
            if queued >= limits.queued:
                raise queue_full(queued)
            if len(self._entries) >= limits.jobs:
                raise store_full(f"{len(self._entries)} jobs kept")
            if self._bytes + entry.size > limits.bytes:
                raise store_full(f"{self._bytes} bytes kept")
            if record.owner is not None:
                active = sum(
                    1
                    for e in self._entries.values()
                    if e.record.owner == record.owner and not e.record.finished
                )
                if active >= limits.per_owner:
                    raise owner_busy(active)
            self._entries[record.id] = entry
            self._bytes += entry.size

    def get(self, job_id: str, *, owner: Owner = ANY_OWNER) -> JobRecord:
        with self._lock:
            return self._entry(job_id, owner).record

    def inputs(self, job_id: str, *, owner: Owner = ANY_OWNER) -> list[bytes]:
        with self._lock:
            return list(self._entry(job_id, owner).inputs)

    def start(self, job_id: str, worker: str) -> str | None:
        with self._lock:
            entry = self._entries.get(job_id)
            if entry is None or entry.record.status != "queued":
                return None
            entry.lease = uuid.uuid4().hex
            entry.heartbeat = self.clock()
            entry.record = entry.record.with_(
                status="running",
                started_at=self.clock(),
                progress=0.0,
                attempts=entry.record.attempts + 1,
                worker=worker,
            )
            return entry.lease

    def progress(self, job_id: str, lease: str, value: float | None) -> bool:
        with self._lock:
            entry = self._current(job_id, lease)
            if entry is None:
                return False
            entry.heartbeat = self.clock()
            if value is not None:
                entry.record = entry.record.with_(progress=min(1.0, max(entry.record.progress, value)))
            return True

    def finish(
        self,
        job_id: str,
        lease: str,
        status: JobStatus,
        *,
        error: dict[str, Any] | None = None,
        result: bytes | None = None,
    ) -> bool:
        with self._lock:
            entry = self._current(job_id, lease)
            if entry is None:
                return False
            self._close(entry, status, error, result)
            if status == "succeeded":
                entry.record = entry.record.with_(progress=1.0)
            return True

    def cancel(self, job_id: str, *, owner: Owner = ANY_OWNER) -> JobRecord:
        with self._lock:
            entry = self._entry(job_id, owner)
            if entry.record.status in ACTIVE:
                self._close(entry, "cancelled", None, None)
            return entry.record

    def result(self, job_id: str, *, owner: Owner = ANY_OWNER) -> bytes:
        with self._lock:
            entry = self._entry(job_id, owner)
            if entry.record.status != "succeeded" or entry.result is None:
                raise JobNotFinished(_not_finished(entry.record))
            return entry.result

    def stale(self, lease_s: float) -> list[str]:
        with self._lock:
            limit = self.clock() - lease_s
            return [
                job_id
                for job_id, e in self._entries.items()
                if e.record.status == "running" and e.heartbeat < limit
            ]

    def recover(self, job_id: str, lease_s: float, max_attempts: int) -> Recovery | None:
        with self._lock:
            entry = self._entries.get(job_id)
            if entry is None or entry.record.status != "running":
                return None
            if entry.heartbeat >= self.clock() - lease_s:
                return None
            if entry.record.attempts >= max_attempts:
                error = lost_worker_error(entry.record.attempts, max_attempts)
                self._close(entry, "failed", error, None)
                return "failed"
            entry.lease = None
            entry.record = entry.record.with_(status="queued", progress=0.0, started_at=None, worker=None)
            return "requeued"

    def counts(self) -> dict[str, int]:
        with self._lock:
            self._expire()
            out = {"queued": 0, "running": 0}
            for e in self._entries.values():
                if e.record.status in out:
                    out[e.record.status] += 1
            return out

    def usage(self) -> tuple[int, int]:
        with self._lock:
            self._expire(force=True)
            return len(self._entries), self._bytes

    def close(self) -> None:
        pass

    # --- helpers (lock held) ----------------------------------------------------------------------
    def _entry(self, job_id: str, owner: Owner) -> _Entry:
        check_job_id(job_id)
        self._expire()
        entry = self._entries.get(job_id)
        if entry is not None and self._expired(entry.record, self.clock()):
            self._bury(job_id, self.clock())
            entry = None
        if entry is not None:
            if not visible(entry.record.owner, owner):
                raise not_found(job_id)
            return entry
        tomb = self._tombstones.get(job_id)
        if tomb is not None and visible(tomb[1], owner):
            raise JobExpired(
                f"job {job_id} finished more than {self.retention_s:g} s ago; its result is gone"
            )
        raise not_found(job_id)

    def _current(self, job_id: str, lease: str) -> _Entry | None:
        entry = self._entries.get(job_id)
        if entry is None or entry.record.status != "running" or entry.lease != lease:
            return None
        return entry

    def _close(
        self, entry: _Entry, status: JobStatus, error: dict[str, Any] | None, result: bytes | None
    ) -> None:
        """Finish the entry; what it holds shrinks to its result (and its inputs, if it keeps them)."""
        before = entry.size
        entry.record = entry.record.with_(status=status, finished_at=self.clock(), error=error)
        entry.lease = None
        entry.reserved = 0
        if status == "succeeded":
            entry.result = result
        if status != "succeeded" or not entry.record.spec.keep_inputs:
            entry.inputs = []
        self._bytes += entry.size - before

    def _expired(self, record: JobRecord, now: float) -> bool:
        return record.finished_at is not None and record.finished_at + self.retention_s <= now

    def _bury(self, job_id: str, now: float) -> None:
        entry = self._entries.pop(job_id)
        self._bytes -= entry.size
        self._tombstones[job_id] = (now + tombstone_s(self.retention_s), entry.record.owner)

    def _expire(self, *, force: bool = False) -> None:
        """Drop finished jobs past retention and forgotten tombstones (at most once a second,
        unless ``force``: the bounds of ``create`` count what is really kept)."""
        now = self.clock()
        if now < self._next_sweep and not force:
            return
        self._next_sweep = now + 1.0
        for job_id in [j for j, e in self._entries.items() if self._expired(e.record, now)]:
            self._bury(job_id, now)
        for job_id in [j for j, (until, _) in self._tombstones.items() if until <= now]:
            del self._tombstones[job_id]


def _not_finished(record: JobRecord) -> str:
    if record.status in ACTIVE:
        return f"job {record.id} is {record.status} ({record.progress:.0%}); poll GET /v1/jobs/{record.id}"
    return f"job {record.id} {record.status}; it has no result"
