"""The job store in Redis: any API replica and any worker see the same jobs.

Keys (``ns`` is ``settings.redis_namespace``):

- ``ns:job:{id}`` — a hash: ``status``, ``progress``, ``created_at``, ``started_at``,
  ``finished_at``, ``error`` (JSON), ``spec`` (JSON), ``attempts``, ``worker``, ``lease``,
  ``owner``, ``input_bytes``, ``keep_inputs``, ``dispatches``;
- ``ns:job:{id}:inputs`` — a list of the uploaded images' bytes, in upload order;
- ``ns:job:{id}:result`` — the encoded result (``service.runtime.jobs.result``);
- ``ns:job:{id}:gone`` — the tombstone that turns an expired job into 410 instead of 404; its
  value is the job's owner, so another owner still gets 404;
- ``ns:jobs:queued`` — a sorted set of queued ids, scored by when the job is next due for a
  re-dispatch (``due_for_dispatch``): the queue bound counts it;
- ``ns:jobs:running`` — a sorted set of running ids, scored by their last heartbeat;
- ``ns:jobs:expiry`` — every kept job, scored by when its keys expire: its size is the number of
  jobs kept, and expired members are swept from the accounting below;
- ``ns:jobs:sizes`` / ``ns:jobs:bytes`` — bytes each job holds (inputs, result, or the reserved
  estimate of a result to come) and their sum: the store's byte bound;
- ``ns:owner:{owner}:active`` — an owner's queued and running ids, scored by when they would
  expire: the per-owner limit. It carries the same TTL, so an owner's set cannot outlive its jobs.

State changes are Lua scripts, so each is atomic and compare-and-set (status and lease), and the
counters change with the state they count. Keys expire by TTL, which no script sees: what they
held is subtracted when a later script (``create``, ``prune``) sweeps ``ns:jobs:expiry`` past its
deadlines. The per-owner key is named inside the scripts from the job's ``owner`` field, which
needs a single Redis rather than a cluster (the global sets need one already).

Times come from the Redis server's clock (``TIME``), so API and workers on different hosts agree
on heartbeat ages. Unfinished jobs keep a safety TTL (visibility timeout + retention) that every
heartbeat renews, so a job running longer than it does not vanish; a finished job's keys expire
``retention_s`` after it finished; the tombstone lives ``tombstone_s`` longer.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

import redis

from service.errors import JobExpired, JobNotFinished
from service.runtime.jobs.store import (
    ACTIVE,
    ANY_OWNER,
    FINISHED,
    JobRecord,
    JobSpec,
    JobStatus,
    Limits,
    Owner,
    Recovery,
    _not_finished,
    check_job_id,
    lost_worker_error,
    not_found,
    owner_busy,
    queue_full,
    store_full,
    tombstone_s,
    visible,
)

_Arg = str | int | float | bytes

# every script gets the same KEYS and the same first two ARGV: the id and the owner key prefix
_KEY_NAMES = ("job", "queued", "running", "tomb", "inputs", "result", "expiry", "sizes", "bytes")

_PRELUDE = """
local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local JOB, QUEUED, RUNNING, TOMB, INPUTS, RESULT, EXPIRY, SIZES, BYTES =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local ID, OWNERS = ARGV[1], ARGV[2]

local function owner_key()
  local owner = redis.call('HGET', JOB, 'owner')
  if not owner or owner == '' then return nil end
  return OWNERS .. owner .. ':active'
end

-- the bytes this job holds now (the running total follows)
local function set_size(n)
  local old = tonumber(redis.call('HGET', SIZES, ID) or '0')
  redis.call('HSET', SIZES, ID, n)
  redis.call('INCRBY', BYTES, n - old)
end

-- every key of the job expires ttl seconds from now; an active job stays in its owner's set
local function keep_for(ttl, active)
  for _, key in ipairs({JOB, INPUTS, RESULT}) do redis.call('EXPIRE', key, ttl) end
  redis.call('ZADD', EXPIRY, now + ttl, ID)
  local ok = owner_key()
  if ok then
    if active then
      redis.call('ZADD', ok, now + ttl, ID)
      redis.call('EXPIRE', ok, ttl)
    else
      redis.call('ZREM', ok, ID)
    end
  end
end

-- forget the accounting of jobs whose keys have expired (at most `limit` of them)
local function sweep(limit)
  local gone = redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(gone) do
    redis.call('DECRBY', BYTES, tonumber(redis.call('HGET', SIZES, id) or '0'))
    redis.call('HDEL', SIZES, id)
    redis.call('ZREM', EXPIRY, id)
  end
  return #gone
end

-- finishing a job: status, time, error; what it keeps; its keys expire; the tombstone is renewed
local function close(status, err, retention, tomb_ttl, result)
  redis.call('HSET', JOB, 'status', status, 'finished_at', tostring(now), 'error', err, 'lease', '')
  redis.call('ZREM', QUEUED, ID)
  redis.call('ZREM', RUNNING, ID)
  local kept = 0
  if status == 'succeeded' then
    redis.call('HSET', JOB, 'progress', '1')
    redis.call('SET', RESULT, result)
    kept = #result
  end
  if status == 'succeeded' and redis.call('HGET', JOB, 'keep_inputs') == '1' then
    kept = kept + tonumber(redis.call('HGET', JOB, 'input_bytes') or '0')
  else
    redis.call('DEL', INPUTS)
  end
  set_size(kept)
  keep_for(retention, false)
  redis.call('SET', TOMB, redis.call('HGET', JOB, 'owner') or '', 'EX', tomb_ttl)
end
"""

# ARGV: id, owners, limits (queued, jobs, bytes, per_owner), size, active_ttl, tomb_ttl, owner,
#       due, field, value, …
_CREATE = (
    _PRELUDE
    + """
if redis.call('EXISTS', JOB) == 1 then return {'exists', 0} end
sweep(1000)
local queued = redis.call('ZCARD', QUEUED)
if queued >= tonumber(ARGV[3]) then return {'queued', queued} end
local jobs = redis.call('ZCARD', EXPIRY)
if jobs >= tonumber(ARGV[4]) then return {'jobs', jobs} end
local used = tonumber(redis.call('GET', BYTES) or '0')
if used + tonumber(ARGV[7]) > tonumber(ARGV[5]) then return {'bytes', used} end
if ARGV[10] ~= '' then
  local ok = OWNERS .. ARGV[10] .. ':active'
  redis.call('ZREMRANGEBYSCORE', ok, '-inf', now)
  local active = redis.call('ZCARD', ok)
  if active >= tonumber(ARGV[6]) then return {'owner', active} end
end
redis.call('HSET', JOB, 'created_at', tostring(now), unpack(ARGV, 12))
redis.call('ZADD', QUEUED, now + tonumber(ARGV[11]), ID)
set_size(tonumber(ARGV[7]))
keep_for(tonumber(ARGV[8]), true)
redis.call('SET', TOMB, ARGV[10], 'EX', ARGV[9])
return {'ok', 0}
"""
)

# ARGV: id, owners, worker, lease, active_ttl
_START = (
    _PRELUDE
    + """
if redis.call('HGET', JOB, 'status') ~= 'queued' then return 0 end
redis.call('HSET', JOB, 'status', 'running', 'started_at', tostring(now), 'worker', ARGV[3],
           'lease', ARGV[4], 'progress', '0')
redis.call('HINCRBY', JOB, 'attempts', 1)
redis.call('ZREM', QUEUED, ID)
redis.call('ZADD', RUNNING, now, ID)
keep_for(tonumber(ARGV[5]), true)
return 1
"""
)

# ARGV: id, owners, lease, progress ('' for a heartbeat), active_ttl
_PROGRESS = (
    _PRELUDE
    + """
local cur = redis.call('HMGET', JOB, 'status', 'lease', 'progress')
if cur[1] ~= 'running' or cur[2] ~= ARGV[3] then return 0 end
if ARGV[4] ~= '' and tonumber(ARGV[4]) > (tonumber(cur[3]) or 0) then
  redis.call('HSET', JOB, 'progress', ARGV[4])
end
redis.call('ZADD', RUNNING, now, ID)
keep_for(tonumber(ARGV[5]), true)
return 1
"""
)

# ARGV: id, owners, lease, status, error, retention, tomb_ttl, result
_FINISH = (
    _PRELUDE
    + """
local cur = redis.call('HMGET', JOB, 'status', 'lease')
if cur[1] ~= 'running' or cur[2] ~= ARGV[3] then return 0 end
close(ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return 1
"""
)

# ARGV: id, owners, retention, tomb_ttl
_CANCEL = (
    _PRELUDE
    + """
local status = redis.call('HGET', JOB, 'status')
if status == 'queued' or status == 'running' then close('cancelled', '', ARGV[3], ARGV[4], '') end
return status
"""
)

# ARGV: id, owners, lease_s, max_attempts, retention, tomb_ttl, error (with {attempts} to fill in),
#       active_ttl, due
_RECOVER = (
    _PRELUDE
    + """
local cur = redis.call('HMGET', JOB, 'status', 'attempts')
if cur[1] ~= 'running' then
  redis.call('ZREM', RUNNING, ID)
  return ''
end
local beat = tonumber(redis.call('ZSCORE', RUNNING, ID) or '0')
if now - beat < tonumber(ARGV[3]) then return '' end
local attempts = tonumber(cur[2]) or 0
if attempts >= tonumber(ARGV[4]) then
  close('failed', string.gsub(ARGV[7], '{attempts}', tostring(attempts)), ARGV[5], ARGV[6], '')
  return 'failed'
end
redis.call('HSET', JOB, 'status', 'queued', 'progress', '0', 'lease', '', 'worker', '', 'started_at', '')
redis.call('ZREM', RUNNING, ID)
redis.call('ZADD', QUEUED, now + tonumber(ARGV[9]), ID)
keep_for(tonumber(ARGV[8]), true)
return 'requeued'
"""
)

# ARGV: id, owners, base_s. A queued job past its due time is due again after twice as long.
_REDISPATCH = (
    _PRELUDE
    + """
if redis.call('HGET', JOB, 'status') ~= 'queued' then
  redis.call('ZREM', QUEUED, ID)
  return 0
end
local due = tonumber(redis.call('ZSCORE', QUEUED, ID) or '0')
if due > now then return 0 end
local n = redis.call('HINCRBY', JOB, 'dispatches', 1)
redis.call('ZADD', QUEUED, now + tonumber(ARGV[3]) * 2 ^ n, ID)
return n
"""
)

# ARGV: id (unused), owners (unused), limit
_SWEEP = _PRELUDE + "\nreturn sweep(tonumber(ARGV[3]))\n"


class RedisJobStore:
    """Job records, inputs and results in Redis (see the module docstring for the layout).

    ``redispatch_s``: how long a queued job waits for a worker before ``due_for_dispatch`` offers
    it for a new message (then twice as long after each one)."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "saliency",
        retention_s: float = 3600,
        active_ttl_s: float = 7 * 3600,
        redispatch_s: float = 120.0,
        client: redis.Redis | None = None,
    ) -> None:
        self.retention_s = retention_s
        self.active_ttl_s = int(active_ttl_s)
        self.redispatch_s = redispatch_s
        self.ns = namespace
        self.redis: redis.Redis = client or redis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
        )
        self._create = self.redis.register_script(_CREATE)
        self._start = self.redis.register_script(_START)
        self._progress = self.redis.register_script(_PROGRESS)
        self._finish = self.redis.register_script(_FINISH)
        self._cancel = self.redis.register_script(_CANCEL)
        self._recover = self.redis.register_script(_RECOVER)
        self._redispatch = self.redis.register_script(_REDISPATCH)
        self._sweep = self.redis.register_script(_SWEEP)

    # --- keys ------------------------------------------------------------------------------------
    def _job(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}"

    def _keys(self, job_id: str, *parts: str) -> list[str]:
        job = self._job(job_id)
        named = {
            "job": job,
            "queued": self._global("queued"),
            "running": self._global("running"),
            "tomb": f"{job}:gone",
            "inputs": f"{job}:inputs",
            "result": f"{job}:result",
            "expiry": self._global("expiry"),
            "sizes": self._global("sizes"),
            "bytes": self._global("bytes"),
        }
        return [named[p] for p in parts]

    def _global(self, name: str) -> str:
        return f"{self.ns}:jobs:{name}"

    @property
    def _owners(self) -> str:
        return f"{self.ns}:owner:"

    def owner_key(self, owner: str) -> str:
        """The sorted set of ``owner``'s active jobs."""
        return f"{self._owners}{owner}:active"

    def _run(self, script: Any, job_id: str, *args: _Arg) -> Any:
        return script(keys=self._keys(job_id, *_KEY_NAMES), args=[job_id, self._owners, *args])

    @property
    def _tomb_ttl(self) -> int:
        return tombstone_s(self.retention_s)

    # --- the store interface ------------------------------------------------------------------------
    def ping(self) -> bool:
        return bool(self.redis.ping())

    def create(self, record: JobRecord, inputs: list[bytes], *, limits: Limits, reserve: int = 0) -> None:
        (inputs_key,) = self._keys(record.id, "inputs")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(inputs_key)
            if inputs:
                pipe.rpush(inputs_key, *inputs)
            pipe.expire(inputs_key, self.active_ttl_s)
            pipe.execute()
        input_bytes = sum(len(b) for b in inputs)
        fields = {
            "status": "queued",
            "progress": "0",
            "spec": record.spec.to_json(),
            "attempts": "0",
            "started_at": "",
            "finished_at": "",
            "error": "",
            "worker": "",
            "lease": "",
            "owner": record.owner or "",
            "input_bytes": str(input_bytes),
            "keep_inputs": "1" if record.spec.keep_inputs else "0",
            "dispatches": "0",
        }
        flat = [x for kv in fields.items() for x in kv]
        limit_args = [limits.queued, limits.jobs, limits.bytes, limits.per_owner]
        outcome, count = self._create(
            keys=self._keys(record.id, *_KEY_NAMES),
            args=[
                record.id,
                self._owners,
                *limit_args,
                input_bytes + reserve,
                self.active_ttl_s,
                self._tomb_ttl,
                record.owner or "",
                self.redispatch_s,
                *flat,
            ],
        )
        outcome, count = _text(outcome), int(count)
        if outcome == "ok":
            return
        self.redis.delete(inputs_key)
        if outcome == "queued":
            raise queue_full(count)
        if outcome == "jobs":
            raise store_full(f"{count} jobs kept")
        if outcome == "bytes":
            raise store_full(f"{count} bytes kept")
        if outcome == "owner":
            raise owner_busy(count)
        raise RuntimeError(f"job id {record.id} exists already")

    def get(self, job_id: str, *, owner: Owner = ANY_OWNER) -> JobRecord:
        check_job_id(job_id)
        raw = self.redis.hgetall(self._job(job_id))
        if not raw:
            (tomb,) = self._keys(job_id, "tomb")
            buried = self.redis.get(tomb)
            if buried is not None and visible(_text(buried) or None, owner):
                raise JobExpired(
                    f"job {job_id} finished more than {self.retention_s:g} s ago; its result is gone"
                )
            raise not_found(job_id)
        record = _record(job_id, {_text(k): _text(v) for k, v in raw.items()})
        if not visible(record.owner, owner):
            raise not_found(job_id)
        return record

    def inputs(self, job_id: str, *, owner: Owner = ANY_OWNER) -> list[bytes]:
        if owner is not ANY_OWNER:
            self.get(job_id, owner=owner)
        (key,) = self._keys(check_job_id(job_id), "inputs")
        return [_bytes(item) for item in self.redis.lrange(key, 0, -1)]

    def start(self, job_id: str, worker: str) -> str | None:
        lease = uuid.uuid4().hex
        ok = self._run(self._start, job_id, worker, lease, self.active_ttl_s)
        return lease if int(ok) == 1 else None

    def progress(self, job_id: str, lease: str, value: float | None) -> bool:
        arg = "" if value is None else f"{min(1.0, max(0.0, value)):.6f}"
        return int(self._run(self._progress, job_id, lease, arg, self.active_ttl_s)) == 1

    def finish(
        self,
        job_id: str,
        lease: str,
        status: JobStatus,
        *,
        error: dict[str, Any] | None = None,
        result: bytes | None = None,
    ) -> bool:
        err = "" if error is None else json.dumps(error)
        args: list[_Arg] = [lease, status, err, int(self.retention_s), self._tomb_ttl, result or b""]
        return int(self._run(self._finish, job_id, *args)) == 1

    def cancel(self, job_id: str, *, owner: Owner = ANY_OWNER) -> JobRecord:
        self.get(job_id, owner=owner)  # an owner never changes: checking it first is enough
        self._run(self._cancel, job_id, int(self.retention_s), self._tomb_ttl)
        return self.get(job_id, owner=owner)

    def result(self, job_id: str, *, owner: Owner = ANY_OWNER) -> bytes:
        record = self.get(job_id, owner=owner)
        if record.status != "succeeded":
            raise JobNotFinished(_not_finished(record))
        (key,) = self._keys(job_id, "result")
        data = self.redis.get(key)
        if data is None:
            raise JobExpired(f"the result of job {job_id} has expired")
        return _bytes(data)

    def stale(self, lease_s: float) -> list[str]:
        ids = self.redis.zrangebyscore(self._global("running"), "-inf", self._now() - lease_s)
        return [_text(i) for i in ids]

    def recover(self, job_id: str, lease_s: float, max_attempts: int) -> Recovery | None:
        error = json.dumps(lost_worker_error("{attempts}", max_attempts))
        args: list[_Arg] = [
            lease_s,
            max_attempts,
            int(self.retention_s),
            self._tomb_ttl,
            error,
            self.active_ttl_s,
            self.redispatch_s,
        ]
        text = _text(self._run(self._recover, job_id, *args) or "")
        return "requeued" if text == "requeued" else "failed" if text == "failed" else None

    def due_for_dispatch(self, limit: int = 32) -> list[str]:
        """Queued jobs that have waited past their due time for a worker to take them: their
        message may be lost (a worker that failed to start them, an enqueue that failed)."""
        ids = self.redis.zrangebyscore(self._global("queued"), "-inf", self._now(), start=0, num=limit)
        return [_text(i) for i in ids]

    def redispatched(self, job_id: str) -> int:
        """Mark a due queued job as sent again; its number of re-dispatches, or 0 when it is not
        due (any more). The next is due after twice the wait of this one, so the duplicates one
        job can cause over its safety TTL are few (log2 of TTL / ``redispatch_s``)."""
        return int(self._run(self._redispatch, job_id, self.redispatch_s))

    def counts(self) -> dict[str, int]:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._global("queued"))
            pipe.zcard(self._global("running"))
            q, r = pipe.execute()
        return {"queued": int(q), "running": int(r)}

    def usage(self) -> tuple[int, int]:
        self._run(self._sweep, "0" * 32, 100_000)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._global("expiry"))
            pipe.get(self._global("bytes"))
            n, used = pipe.execute()
        return int(n), int(used or 0)

    def prune(self) -> int:
        """Forget jobs whose keys have expired: the byte and job accounting, and their ids in the
        active sets (their safety TTL ran out)."""
        dropped = int(self._run(self._sweep, "0" * 32, 10_000))
        for name in ("queued", "running"):
            key = self._global(name)
            for raw in self.redis.zrange(key, 0, -1):
                job_id = _text(raw)
                if not self.redis.exists(self._job(job_id)):
                    dropped += int(self.redis.zrem(key, job_id))
        return dropped

    def close(self) -> None:
        self.redis.close()

    def _now(self) -> float:
        seconds, micros = self.redis.time()
        return float(seconds) + float(micros) / 1e6


def _record(job_id: str, h: dict[str, str]) -> JobRecord:
    status = h.get("status", "")
    if status not in ACTIVE | FINISHED:
        raise RuntimeError(f"job {job_id} has an unknown status {status!r} in Redis")
    return JobRecord(
        id=job_id,
        status=cast(JobStatus, status),
        spec=JobSpec.from_json(h["spec"]),
        created_at=_float(h.get("created_at")) or 0.0,
        progress=_float(h.get("progress")) or 0.0,
        started_at=_float(h.get("started_at")),
        finished_at=_float(h.get("finished_at")),
        error=json.loads(h["error"]) if h.get("error") else None,
        attempts=int(h.get("attempts") or 0),
        worker=h.get("worker") or None,
        owner=h.get("owner") or None,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _float(text: str | None) -> float | None:
    return float(text) if text else None
