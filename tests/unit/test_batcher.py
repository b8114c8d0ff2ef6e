"""Dynamic batching: the queue's gathering rules, the batch key, and batched == alone.

Batched results are compared with the engine called on each request alone. They are not bit-for-bit
equal: a convolution over a batch of 4 may sum in another order than over a batch of 1. Measured on
this CPU (ResNet-18 and the small CNN below, every method): the largest difference is below 1e-6 of
the map's peak (a few float32 ulps). The tolerance is 4e-6 of the peak.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from service.errors import DeadlineExceeded, InvalidParameter, Overloaded, TargetOutOfRange
from service.explainers import ExplainParams, ModelHandle, Targets, all_methods, explain
from service.metrics import Metrics
from service.runtime.sync.batcher import BatchQueue, batch_key
from service.runtime.sync.devices import PriorityGate
from service.runtime.sync.executor import Executor

RTOL_OF_PEAK = 4e-6
N = 4


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 6),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def handle() -> ModelHandle:
    return ModelHandle(module=small_cnn(), target_layer="6", name="cnn")


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(N, 3, 24, 24, generator=torch.Generator().manual_seed(1))


def run_concurrently(executor: Executor, handle: ModelHandle, calls: list[dict[str, object]]) -> list[object]:
    """Submit every call while the device is busy, then let it go: all of them are queued when the
    worker next takes a batch, so how they are batched does not depend on timing."""
    _, release = block_device(executor, handle)

    async def main() -> list[object]:
        tasks = [asyncio.ensure_future(executor.explain(**c)) for c in calls]  # type: ignore[arg-type]
        for _ in range(100_000):
            if executor.waiting(handle) == len(calls):
                break
            await asyncio.sleep(0.001)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        return asyncio.run(main())
    finally:
        release.set()


def batch_sizes(metrics: Metrics) -> tuple[float, float]:
    """(number of engine calls, images in them) recorded by the executor."""
    count = metrics.registry.get_sample_value("saliency_batch_size_count", {"model": "cnn"}) or 0.0
    total = metrics.registry.get_sample_value("saliency_batch_size_sum", {"model": "cnn"}) or 0.0
    return count, total


def batching_executor(metrics: Metrics, size: int = N) -> Executor:
    # a batch size of exactly the request count and a long delay: nothing is dispatched half-full
    return Executor(batching=True, batch_max_delay_ms=60_000, batch_max_size=size, metrics=metrics)


# ------------------------------------------------------------------------------------------------
# batched == alone, every registered method
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [m.name for m in all_methods() if m.family != "attention"])
def test_batched_results_equal_each_request_alone(
    method: str, handle: ModelHandle, inputs: torch.Tensor
) -> None:
    params = ExplainParams(steps=6, samples=3, masks=8, seed=11, batch_size=64)
    metrics = Metrics()
    executor = batching_executor(metrics)
    try:
        # explicit, different targets per request: each image keeps its own
        calls = [
            {
                "handle": handle,
                "x": inputs[i : i + 1],
                "method": method,
                "params": params,
                "targets": Targets.given([[i % 6, 5]]),
            }
            for i in range(N)
        ]
        results = run_concurrently(executor, handle, calls)
    finally:
        executor.shutdown()
    assert batch_sizes(metrics) == (1.0, float(N)), "the requests did not share one engine call"
    for i, got in enumerate(results):
        alone = explain(handle, inputs[i : i + 1], method, params, targets=Targets.given([[i % 6, 5]]))
        assert not isinstance(got, BaseException), got
        peak = float(alone.maps.abs().max())
        assert peak > 0, f"{method}: degenerate map, the comparison would prove nothing"
        assert torch.equal(got.targets, alone.targets)  # type: ignore[union-attr]
        torch.testing.assert_close(got.maps, alone.maps, rtol=0, atol=RTOL_OF_PEAK * peak)  # type: ignore[union-attr]
        torch.testing.assert_close(got.scores, alone.scores, rtol=1e-5, atol=1e-6)  # type: ignore[union-attr]
        if alone.attributions is not None:
            a_peak = float(alone.attributions.abs().max())
            torch.testing.assert_close(
                got.attributions, alone.attributions, rtol=0, atol=RTOL_OF_PEAK * a_peak
            )  # type: ignore[union-attr]
        assert got.params.seed == 11  # type: ignore[union-attr]


def test_top_k_requests_batch_and_keep_their_own_top_classes(
    handle: ModelHandle, inputs: torch.Tensor
) -> None:
    metrics = Metrics()
    executor = batching_executor(metrics)
    params = ExplainParams(seed=3)
    try:
        calls = [
            {
                "handle": handle,
                "x": inputs[i : i + 1],
                "method": "gradcam",
                "params": params,
                "targets": Targets.top(2),
            }
            for i in range(N)
        ]
        results = run_concurrently(executor, handle, calls)
    finally:
        executor.shutdown()
    assert batch_sizes(metrics) == (1.0, float(N))
    for i, got in enumerate(results):
        alone = explain(handle, inputs[i : i + 1], "gradcam", params, targets=Targets.top(2))
        assert torch.equal(got.targets, alone.targets)  # type: ignore[union-attr]
        torch.testing.assert_close(
            got.maps, alone.maps, rtol=0, atol=RTOL_OF_PEAK * float(alone.maps.abs().max())
        )  # type: ignore[union-attr]


def test_one_bad_request_does_not_fail_the_batch(handle: ModelHandle, inputs: torch.Tensor) -> None:
    metrics = Metrics()
    executor = batching_executor(metrics)
    params = ExplainParams()
    try:
        calls = [
            {
                "handle": handle,
                "x": inputs[i : i + 1],
                "method": "saliency",
                "params": params,
                "targets": Targets.given([[9 if i == 2 else 1]]),
            }
            for i in range(N)
        ]
        results = run_concurrently(executor, handle, calls)
    finally:
        executor.shutdown()
    assert isinstance(results[2], TargetOutOfRange)
    for i in (0, 1, 3):
        alone = explain(handle, inputs[i : i + 1], "saliency", params, targets=Targets.given([[1]]))
        torch.testing.assert_close(
            results[i].maps, alone.maps, rtol=0, atol=RTOL_OF_PEAK * float(alone.maps.abs().max())
        )  # type: ignore[union-attr]


def test_noise_requests_without_seed_run_alone(handle: ModelHandle, inputs: torch.Tensor) -> None:
    metrics = Metrics()
    executor = batching_executor(metrics)
    try:
        calls = [
            {"handle": handle, "x": inputs[:1], "method": "smoothgrad", "params": ExplainParams(samples=2)}
            for _ in range(3)
        ]
        results = run_concurrently(executor, handle, calls)
    finally:
        executor.shutdown()
    assert batch_sizes(metrics) == (3.0, 3.0)
    seeds = {r.params.seed for r in results}  # type: ignore[union-attr]
    assert len(seeds) == 3  # each drew its own seed: independent noise
    assert not torch.equal(results[0].maps, results[1].maps)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------
# the batch key
# ------------------------------------------------------------------------------------------------
def test_batch_key(handle: ModelHandle, inputs: torch.Tensor) -> None:
    x = inputs[:1]
    other = ModelHandle(module=handle.module, target_layer="6", name="other")

    def key(
        method: str,
        seed: int | None = None,
        top_k: int = 1,
        rows: torch.Tensor | None = None,
        h: ModelHandle = handle,
    ) -> object:
        targets = Targets.top(top_k) if rows is None else Targets.given(rows)
        return batch_key(h, x, method, ExplainParams(seed=seed), targets)

    # gradient and CAM methods use no randomness: the seed does not keep requests apart
    assert key("gradcam", None) == key("gradcam", 5) is not None
    assert key("saliency", 1) == key("saliency", 2)
    # noise: only equal explicit seeds batch; no seed means independent noise, so alone
    assert key("smoothgrad", None) is None
    assert key("smoothgrad", 4) == key("smoothgrad", 4) != key("smoothgrad", 5)
    assert key("gradcam") != key("gradcam_pp")
    assert key("gradcam", top_k=1) != key("gradcam", top_k=2)
    assert key("gradcam", rows=torch.tensor([[1]])) == key("gradcam", rows=torch.tensor([[3]]))
    assert key("gradcam", rows=torch.tensor([[1]])) != key("gradcam", rows=torch.tensor([[1, 2]]))
    assert key("gradcam", rows=torch.tensor([[1]])) != key("gradcam", top_k=1)
    assert key("gradcam", h=other) != key("gradcam")
    assert batch_key(handle, x, "gradcam", ExplainParams(batch_size=8), Targets.top(1)) != key("gradcam")
    # fp32 and bf16 requests never share an engine call (nor do auto ones with either)
    precisions = {
        p: batch_key(handle, x, "gradcam", ExplainParams(precision=p), Targets.top(1))
        for p in ("fp32", "bf16", "auto")
    }
    assert precisions["fp32"] == key("gradcam") and len(set(precisions.values())) == 3
    assert batch_key(handle, torch.zeros(1, 3, 20, 20), "gradcam", ExplainParams(), Targets.top(1)) != key(
        "gradcam"
    )


def test_target_rows() -> None:
    assert torch.equal(Targets.given([[1, 2], [3, 4]]).rows(2), torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(Targets.given([7]).rows(1), torch.tensor([[7]]))
    with pytest.raises(InvalidParameter):  # not one row per image
        Targets.given([[1], [2]]).rows(3)
    with pytest.raises(InvalidParameter):  # ragged
        Targets.given([[1, 2], [3]])


# ------------------------------------------------------------------------------------------------
# BatchQueue on its own
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Item:
    key: object
    size: int = 1
    enqueued: float = 0.0  # long ago: no waiting for more
    future: Future[object] = field(default_factory=Future)
    name: str = ""


def names(batch: list[Item] | None) -> list[str]:
    assert batch is not None
    return [i.name for i in batch]


def test_queue_gathers_compatible_items_in_order_up_to_the_size() -> None:
    q: BatchQueue[Item] = BatchQueue(max_size=4, max_delay_s=0.0)
    for name, key, size in [
        ("a1", "a", 1),
        ("b1", "b", 1),
        ("a2", "a", 2),
        ("a3", "a", 2),
        ("a4", "a", 1),
        ("n", None, 1),
        ("b2", "b", 1),
    ]:
        q.put(Item(key, size, name=name))
    assert names(q.take()) == ["a1", "a2", "a4"]  # a3 (2 images) would exceed 4
    assert names(q.take()) == ["b1", "b2"]
    assert names(q.take()) == ["a3"]
    assert names(q.take()) == ["n"]  # no key: alone
    assert len(q) == 0


def test_queue_drops_cancelled_items_and_ends_when_closed() -> None:
    q: BatchQueue[Item] = BatchQueue(max_size=8, max_delay_s=0.0)
    items = [Item("a", name=f"a{i}") for i in range(4)]
    for item in items:
        q.put(item)
    items[0].future.cancel()
    items[2].future.cancel()
    assert names(q.take()) == ["a1", "a3"]
    assert q.close() == []
    assert q.take() is None
    with pytest.raises(RuntimeError):
        q.put(Item("a"))


def take_in_thread(q: BatchQueue[Item]) -> tuple[threading.Thread, list[list[Item] | None]]:
    taken: list[list[Item] | None] = []
    consumer = threading.Thread(target=lambda: taken.append(q.take()))
    consumer.start()
    return consumer, taken


def test_a_lone_request_runs_at_once() -> None:
    q: BatchQueue[Item] = BatchQueue(max_size=8, max_delay_s=600.0)
    q.put(Item("a", enqueued=time.monotonic(), name="lone"))  # first of its key: no companion in sight
    consumer, taken = take_in_thread(q)
    consumer.join(60)
    assert not consumer.is_alive() and names(taken[0]) == ["lone"]


def test_a_burst_waits_for_more_until_the_batch_is_full() -> None:
    q: BatchQueue[Item] = BatchQueue(max_size=3, max_delay_s=600.0)
    now = time.monotonic()
    q.put(Item("a", enqueued=now, name="earlier"))
    assert names(q.take()) == ["earlier"]
    q.put(Item("a", enqueued=now + 0.001, name="first"))  # 1 ms after the previous one: a burst
    consumer, taken = take_in_thread(q)
    q.put(Item("b", name="other"))
    q.put(Item("a", enqueued=now + 0.002, name="second"))
    q.put(Item("a", enqueued=now + 0.003, name="third"))  # full: take returns long before the delay
    consumer.join(60)
    assert not consumer.is_alive()
    assert names(taken[0]) == ["first", "second", "third"]
    assert names(q.take()) == ["other"]


def test_queue_does_not_wait_for_an_item_that_already_waited() -> None:
    clock = [1000.0]
    q: BatchQueue[Item] = BatchQueue(max_size=8, max_delay_s=0.005, clock=lambda: clock[0])
    q.put(Item("a", enqueued=989.999, name="before"))
    q.put(Item("a", enqueued=990.0, name="old"))
    assert names(q.take()) == ["before", "old"]
    q.put(Item("a", enqueued=990.001, name="late"))  # a burst, but it has waited 10 s already
    assert names(q.take()) == ["late"]


# ------------------------------------------------------------------------------------------------
# deadlines, the queue bound and the priority gate
# ------------------------------------------------------------------------------------------------
def block_device(executor: Executor, handle: ModelHandle) -> tuple[threading.Event, threading.Event]:
    """Occupy the device worker with a call that waits; returns (started, release)."""
    from service.runtime.sync.batcher import CallRequest

    started, release = threading.Event(), threading.Event()

    def hold(_cancelled: object) -> None:
        started.set()
        release.wait(60)

    executor.worker(handle.device).submit(CallRequest(fn=hold))
    assert started.wait(60)
    return started, release


def test_a_request_past_its_deadline_while_queued_never_runs(
    handle: ModelHandle, inputs: torch.Tensor
) -> None:
    executor = Executor(batching=False, timeout_s=60)
    ran: list[bool] = []
    original = handle.prepared

    def spy(keep: str | None = None) -> nn.Module:
        ran.append(True)
        return original(keep)

    _, release = block_device(executor, handle)
    handle.prepared = spy  # type: ignore[method-assign]
    try:

        async def late() -> None:
            await executor.explain(handle, inputs[:1], "gradcam", ExplainParams(), timeout=0.05)

        with pytest.raises(DeadlineExceeded):
            asyncio.run(late())
        release.set()
        executor.shutdown()
    finally:
        release.set()
        handle.prepared = original  # type: ignore[method-assign]
    assert ran == []


def test_the_queue_bound_is_per_model(handle: ModelHandle, inputs: torch.Tensor) -> None:
    executor = Executor(batching=False, queue_size=1, timeout_s=60)
    _, release = block_device(executor, handle)

    async def two() -> list[object]:
        first = asyncio.ensure_future(executor.explain(handle, inputs[:1], "gradcam", ExplainParams()))
        await asyncio.sleep(0)
        second = await asyncio.gather(
            executor.explain(handle, inputs[:1], "gradcam", ExplainParams()), return_exceptions=True
        )
        release.set()
        return [await first, *second]

    try:
        first, second = asyncio.run(two())
    finally:
        release.set()
        executor.shutdown()
    assert isinstance(second, Overloaded) and second.retry_after >= 1
    assert first.maps.shape == (1, 1, 24, 24)  # type: ignore[attr-defined]
    assert executor.waiting(handle) == 0


def test_priority_gate_holds_background_work_while_foreground_is_pending() -> None:
    gate = PriorityGate()
    idle = threading.Thread(target=gate.yield_to_foreground, args=(600,))
    idle.start()
    idle.join(60)
    assert not idle.is_alive()  # nothing pending: no wait
    gate.enter()
    assert gate.busy
    assert gate.yield_to_foreground(0.01) >= 0.01  # bounded even while busy
    resumed = threading.Event()
    waiter = threading.Thread(target=lambda: (gate.yield_to_foreground(60), resumed.set()))
    waiter.start()
    assert not resumed.wait(0.05)
    gate.leave()
    waiter.join(60)
    assert resumed.is_set() and not gate.busy
