"""The job store in Redis: any API replica and any worker see the same jobs.

Keys (``ns`` is ``settings.redis_namespace``):

- ``ns:job:{id}`` — a hash: ``status``, ``progress``, ``created_at``, ``started_at``,
  ``finished_at``, ``error`` (JSON), ``spec`` (JSON), ``attempts``, ``worker``, ``lease``;
- ``ns:job:{id}:inputs`` — a list of the uploaded images' bytes, in upload order;
- ``ns:job:{id}:result`` — the encoded result (``service.runtime.jobs.result``);
- ``ns:job:{id}:gone`` — the tombstone that turns an expired job into 410 instead of 404;
- ``ns:jobs:queued`` / ``ns:jobs:running`` — sorted sets of active ids (score: queued at / last
  heartbeat), for the queue bound and for finding jobs whose worker died.

State changes are Lua scripts, so each is atomic and compare-and-set (status and lease). Times
come from the Redis server's clock (``TIME``), so API and workers on different hosts agree on
heartbeat ages. Unfinished jobs keep a safety TTL (visibility timeout + retention); a finished
job's keys expire ``retention_s`` after it finished; the tombstone lives ``tombstone_s`` longer.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

import redis

from service.errors import JobExpired, JobNotFinished, JobNotFound, Overloaded
from service.runtime.jobs.store import (
    ACTIVE,
    FINISHED,
    JobRecord,
    JobSpec,
    JobStatus,
    Recovery,
    _not_finished,
    check_job_id,
    lost_worker_error,
    tombstone_s,
)

_Arg = str | int | float | bytes

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# KEYS: job, queued, tomb   ARGV: limit, id, active_ttl, tomb_ttl, field, value, …
_CREATE = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'created_at', tostring(now), unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[4])
return 1
"""
)

# KEYS: job, queued, running, inputs   ARGV: id, worker, lease, active_ttl
_START = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', tostring(now), 'worker', ARGV[2],
           'lease', ARGV[3], 'progress', '0')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[4])
return 1
"""
)

# KEYS: job, running   ARGV: id, lease, progress ('' for a heartbeat)
_PROGRESS = (
    _NOW
    + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'lease', 'progress')
if cur[1] ~= 'running' or cur[2] ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' and tonumber(ARGV[3]) > (tonumber(cur[3]) or 0) then
  redis.call('HSET', KEYS[1], 'progress', ARGV[3])
end
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
"""
)

# shared tail of finishing a job: status, time, error; keys expire; the tombstone is renewed
_CLOSE = """
local function close(status, err, retention, tomb_ttl)
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', tostring(now), 'error', err, 'lease', '')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[1], retention)
  redis.call('SET', KEYS[4], '1', 'EX', tomb_ttl)
  if status == 'succeeded' then
    redis.call('EXPIRE', KEYS[5], retention)
  else
    redis.call('DEL', KEYS[5])
  end
end
"""

# KEYS: job, queued, running, tomb, inputs, result   ARGV: id, lease, status, error, retention, tomb_ttl, result
_FINISH = (
    _NOW
    + _CLOSE
    + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'lease')
if cur[1] ~= 'running' or cur[2] ~= ARGV[2] then return 0 end
close(ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if ARGV[3] == 'succeeded' then
  redis.call('HSET', KEYS[1], 'progress', '1')
  redis.call('SET', KEYS[6], ARGV[7], 'EX', ARGV[5])
end
return 1
"""
)

# KEYS: job, queued, running, tomb, inputs   ARGV: id, retention, tomb_ttl
_CANCEL = (
    _NOW
    + _CLOSE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then close('cancelled', '', ARGV[2], ARGV[3]) end
return status
"""
)

# KEYS: job, queued, running, tomb, inputs   ARGV: id, lease_s, max_attempts, retention, tomb_ttl,
#                                                   error (with {attempts} to fill in), active_ttl
_RECOVER = (
    _NOW
    + _CLOSE
    + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'attempts')
if cur[1] ~= 'running' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return ''
end
local beat = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]) or '0')
if now - beat < tonumber(ARGV[2]) then return '' end
local attempts = tonumber(cur[2]) or 0
if attempts >= tonumber(ARGV[3]) then
  close('failed', string.gsub(ARGV[6], '{attempts}', tostring(attempts)), ARGV[4], ARGV[5])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'progress', '0', 'lease', '', 'worker', '', 'started_at', '')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[5], ARGV[7])
return 'requeued'
"""
)


class RedisJobStore:
    """Job records, inputs and results in Redis (see the module docstring for the layout)."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "saliency",
        retention_s: float = 3600,
        active_ttl_s: float = 7 * 3600,
        client: redis.Redis | None = None,
    ) -> None:
        self.retention_s = retention_s
        self.active_ttl_s = int(active_ttl_s)
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
        }
        return [named[p] for p in parts]

    def _global(self, name: str) -> str:
        return f"{self.ns}:jobs:{name}"

    @property
    def _tomb_ttl(self) -> int:
        return tombstone_s(self.retention_s)

    # --- the store interface ------------------------------------------------------------------------
    def ping(self) -> bool:
        return bool(self.redis.ping())

    def create(self, record: JobRecord, inputs: list[bytes], *, max_queued: int) -> None:
        job, queued, tomb, inputs_key = self._keys(record.id, "job", "queued", "tomb", "inputs")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(inputs_key)
            if inputs:
                pipe.rpush(inputs_key, *inputs)
            pipe.expire(inputs_key, self.active_ttl_s)
            pipe.execute()
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
        }
        flat = [x for kv in fields.items() for x in kv]
        created = self._create(
            keys=[job, queued, tomb], args=[max_queued, record.id, self.active_ttl_s, self._tomb_ttl, *flat]
        )
        if int(created) == 1:
            return
        self.redis.delete(inputs_key)
        if int(created) == 0:
            raise Overloaded(f"{max_queued} jobs are already queued; retry later", retry_after=5)
        raise RuntimeError(f"job id {record.id} exists already")

    def get(self, job_id: str) -> JobRecord:
        check_job_id(job_id)
        raw = self.redis.hgetall(self._job(job_id))
        if not raw:
            (tomb,) = self._keys(job_id, "tomb")
            if self.redis.exists(tomb):
                raise JobExpired(
                    f"job {job_id} finished more than {self.retention_s:g} s ago; its result is gone"
                )
            raise JobNotFound(f"no job with id {job_id!r}")
        return _record(job_id, {_text(k): _text(v) for k, v in raw.items()})

    def inputs(self, job_id: str) -> list[bytes]:
        (key,) = self._keys(check_job_id(job_id), "inputs")
        return [_bytes(item) for item in self.redis.lrange(key, 0, -1)]

    def start(self, job_id: str, worker: str) -> str | None:
        lease = uuid.uuid4().hex
        keys = self._keys(job_id, "job", "queued", "running", "inputs")
        ok = self._start(keys=keys, args=[job_id, worker, lease, self.active_ttl_s])
        return lease if int(ok) == 1 else None

    def progress(self, job_id: str, lease: str, value: float | None) -> bool:
        keys = self._keys(job_id, "job", "running")
        arg = "" if value is None else f"{min(1.0, max(0.0, value)):.6f}"
        return int(self._progress(keys=keys, args=[job_id, lease, arg])) == 1

    def finish(
        self,
        job_id: str,
        lease: str,
        status: JobStatus,
        *,
        error: dict[str, Any] | None = None,
        result: bytes | None = None,
    ) -> bool:
        keys = self._keys(job_id, "job", "queued", "running", "tomb", "inputs", "result")
        err = "" if error is None else json.dumps(error)
        args: list[_Arg] = [job_id, lease, status, err, int(self.retention_s), self._tomb_ttl, result or b""]
        return int(self._finish(keys=keys, args=args)) == 1

    def cancel(self, job_id: str) -> JobRecord:
        check_job_id(job_id)
        keys = self._keys(job_id, "job", "queued", "running", "tomb", "inputs")
        self._cancel(keys=keys, args=[job_id, int(self.retention_s), self._tomb_ttl])
        return self.get(job_id)

    def result(self, job_id: str) -> bytes:
        record = self.get(job_id)
        if record.status != "succeeded":
            raise JobNotFinished(_not_finished(record))
        (key,) = self._keys(job_id, "result")
        data = self.redis.get(key)
        if data is None:
            raise JobExpired(f"the result of job {job_id} has expired")
        return _bytes(data)

    def stale(self, lease_s: float) -> list[str]:
        seconds, micros = self.redis.time()
        now = float(seconds) + float(micros) / 1e6
        ids = self.redis.zrangebyscore(self._global("running"), "-inf", now - lease_s)
        return [_text(i) for i in ids]

    def recover(self, job_id: str, lease_s: float, max_attempts: int) -> Recovery | None:
        keys = self._keys(job_id, "job", "queued", "running", "tomb", "inputs")
        error = json.dumps(lost_worker_error("{attempts}", max_attempts))
        args: list[_Arg] = [
            job_id,
            lease_s,
            max_attempts,
            int(self.retention_s),
            self._tomb_ttl,
            error,
            self.active_ttl_s,
        ]
        out = self._recover(keys=keys, args=args)
        text = _text(out or "")
        return "requeued" if text == "requeued" else "failed" if text == "failed" else None

    def counts(self) -> dict[str, int]:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._global("queued"))
            pipe.zcard(self._global("running"))
            q, r = pipe.execute()
        return {"queued": int(q), "running": int(r)}

    def prune(self) -> int:
        """Drop ids of the active sets whose record has expired (their safety TTL ran out)."""
        dropped = 0
        for name in ("queued", "running"):
            key = self._global(name)
            for raw in self.redis.zrange(key, 0, -1):
                job_id = _text(raw)
                if not self.redis.exists(self._job(job_id)):
                    dropped += int(self.redis.zrem(key, job_id))
        return dropped

    def close(self) -> None:
        self.redis.close()


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
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _float(text: str | None) -> float | None:
    return float(text) if text else None
