"""Dynamic batching of synchronous explain requests.

Concurrent requests for the same model, method and parameters are gathered for up to a short
delay (measured from the arrival of the oldest one; see ``BatchQueue`` for when it waits at all)
and up to a maximum number of images, run as one engine call, and split back per request with
``Explanation.select``.

Which requests may share a call (``batch_key``):

- the same model replica, method, ``ExplainParams``, input shape, and the same kind of target
  (``Targets.kind``: top-k with the same k, or explicit targets with the same count per image);
- the seed: a method that declares ``seed`` among the parameters it uses draws random numbers
  from it (noise, random baselines). Every image of one engine call draws the same sequence from
  the call's seed, so requests with the *same explicit seed* get exactly what they would get alone.
  A request without a seed gets a fresh random seed of its own; batching several of them would
  hand them one shared seed and identical noise, so such requests run alone. Methods that use no
  randomness (CAM and gradient methods) ignore the seed and batch regardless of it.

``BatchQueue`` is the thread-safe queue a device worker takes batches from; it knows only keys,
sizes and arrival times, so it is tested on its own.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor

from service.explainers import ExplainParams, Explanation, ModelHandle, Targets, get_method


class Queued(Protocol):
    """What ``BatchQueue`` needs of an item."""

    @property
    def key(self) -> Hashable | None: ...  # None: never batched with another item

    @property
    def size(self) -> int: ...  # images

    @property
    def enqueued(self) -> float: ...  # monotonic arrival time

    @property
    def future(self) -> Future[Any]: ...


Q = TypeVar("Q", bound=Queued)


class BatchQueue(Generic[Q]):
    """FIFO of work items; ``take`` returns the oldest item plus the compatible ones behind it.

    A batch is the head item and, in arrival order, every queued item with the same key that
    still fits under ``max_size`` images. When the batch is not full, ``take`` waits until
    ``max_delay_s`` after the head's arrival for more to come — but only while requests of that
    key arrive less than ``max_delay_s`` apart (the head came within ``max_delay_s`` of the one
    before it). A lone request, or one of a sequential client, runs at once instead of paying
    the delay for companions that are not coming; under concurrent load the requests that
    queued while the device was busy are gathered anyway. Items whose future was cancelled are
    dropped. ``take`` returns ``None`` once the queue is closed and empty.
    """

    def __init__(
        self, max_size: int, max_delay_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_size = max(1, max_size)
        self.max_delay_s = max(0.0, max_delay_s)
        self._clock = clock
        self._items: deque[Q] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._last_arrival: dict[Hashable, float] = {}  # key → when its latest item arrived
        self._gap: dict[int, float] = {}  # id(item) → time since the previous item of its key

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: Q) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the queue is closed")
            if item.key is not None:
                if len(self._last_arrival) > 4096:
                    self._last_arrival.clear()
                previous = self._last_arrival.get(item.key)
                self._last_arrival[item.key] = item.enqueued
                self._gap[id(item)] = math.inf if previous is None else item.enqueued - previous
            self._items.append(item)
            self._cond.notify_all()

    def close(self) -> list[Q]:
        """Stop accepting items; returns (and removes) the items still queued."""
        with self._cond:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            self._gap.clear()
            self._cond.notify_all()
            return left

    def take(self) -> list[Q] | None:
        with self._cond:
            while True:
                while self._items and self._items[0].future.cancelled():
                    self._gap.pop(id(self._items.popleft()), None)
                if self._items:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            head = self._items.popleft()
            gap = self._gap.pop(id(head), math.inf)
            batch = [head]
            if head.key is None or self.max_size <= 1:
                return batch
            total = head.size
            deadline = head.enqueued + (self.max_delay_s if gap <= self.max_delay_s else 0.0)
            while True:
                total = self._gather(head.key, batch, total)
                remaining = deadline - self._clock()
                if total >= self.max_size or self._closed or remaining <= 0:
                    return batch
                self._cond.wait(remaining)

    def _gather(self, key: Hashable, batch: list[Q], total: int) -> int:
        kept: deque[Q] = deque()
        for item in self._items:
            if item.future.cancelled():
                self._gap.pop(id(item), None)
                continue
            if item.key == key and total + item.size <= self.max_size:
                self._gap.pop(id(item), None)
                batch.append(item)
                total += item.size
            else:
                kept.append(item)
        self._items = kept
        return total


# ------------------------------------------------------------------------------------------------
# explain requests
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ExplainRequest:
    """One synchronous explain call waiting for (or running on) a device worker."""

    handle: ModelHandle
    x: Tensor
    method: str
    params: ExplainParams
    targets: Targets
    key: Hashable | None
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[Explanation] = field(default_factory=Future)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


@dataclass(eq=False)
class CallRequest:
    """Any other model work (``predict``): never batched."""

    fn: Callable[[Callable[[], bool]], Any]
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[Any] = field(default_factory=Future)
    stop: threading.Event = field(default_factory=threading.Event)
    key: Hashable | None = None
    size: int = 1


def make_request(
    handle: ModelHandle, x: Tensor, method: str, params: ExplainParams, targets: Targets, *, batching: bool
) -> ExplainRequest:
    """The queued form of one explain call, with its batch key (``None``: runs alone)."""
    key = batch_key(handle, x, method, params, targets) if batching and x.dim() == 4 else None
    return ExplainRequest(handle, x, method, params, targets, key)


def batch_key(
    handle: ModelHandle, x: Tensor, method: str, params: ExplainParams, targets: Targets
) -> Hashable | None:
    """What must be equal for two requests to share one engine call (see the module docstring)."""
    m = get_method(method)
    if "seed" in m.uses:
        if params.seed is None:
            return None  # its own random seed: independent noise, so it runs alone
    else:
        params = params.with_(seed=None)  # not used by the method: no reason to keep requests apart
    return (id(handle), m.name, params, targets.kind, tuple(x.shape[1:]), x.dtype, x.device)


def combine(requests: list[ExplainRequest]) -> tuple[Tensor, Targets]:
    """The batch's input and its targets."""
    return torch.cat([r.x for r in requests]), Targets.concat(r.targets for r in requests)


def split(explanation: Explanation, requests: list[ExplainRequest]) -> list[Explanation]:
    """Per-request explanations, in the order of ``requests``."""
    out: list[Explanation] = []
    start = 0
    for r in requests:
        part = explanation.select(slice(start, start + r.size))
        if r.params.seed is not None and r.params.seed != part.params.seed:
            # a method that ignores the seed was batched regardless of it: report the request's own
            part = replace(part, params=part.params.with_(seed=r.params.seed))
        out.append(part)
        start += r.size
    return out
