"""``saliency_client`` against a real server on 127.0.0.1 (``tiny_service``): every endpoint round-
trips, sync and async; errors arrive as typed exceptions; 429/503 are retried after Retry-After.

Numbers are checked against each other, not against stored values: the same seed gives the same
map whether it comes back as JSON, npy, inside a compare, or from a job.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from client_helpers import CLIENT_TEST_KEY, live_server
from jobs_helpers import png
from PIL import Image
from saliency_client import (
    AsyncClient,
    Client,
    Conflict,
    Job,
    JobFailed,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SEED = 7


@pytest.fixture(scope="module")
def url(tiny_service: tuple[str, object]) -> str:
    return tiny_service[0]


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[Client]:
    with Client(url, api_key=CLIENT_TEST_KEY, timeout=120) as c:
        yield c


def test_describe_models_layers_methods(client: Client) -> None:
    [info] = client.models()
    assert info.name == "tiny" and info.num_classes == 10 and info.input_size == [3, 32, 32] and info.ready
    assert client.model("tiny") == info
    layers = client.layers("tiny")
    defaults = [layer.name for layer in layers if layer.default]
    assert defaults == [info.target_layer]
    assert all(len(layer.shape) == 3 and layer.layout == "nchw" for layer in layers)
    methods = {m.name: m for m in client.methods()}
    assert set(info.methods) <= set(methods)
    assert methods["integrated_gradients"].parameters["properties"]["steps"]["maximum"] >= 32


def test_predict_and_explain_formats_agree(client: Client) -> None:
    image = png(0)
    pred = client.predict("tiny", image, top_k=3)
    probs = [p.probability for p in pred.predictions]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001

    js = client.explain("tiny", image, method="saliency", seed=SEED, normalize="none")
    assert js.format == "json" and js.model == "tiny" and js.method == "saliency"
    assert (
        js.parameters is not None and js.parameters["seed"] == SEED and js.parameters["normalize"] == "none"
    )
    assert js.target is not None and js.target.index == pred.predictions[0].index
    assert js.array is not None and js.array.shape == (1, 30, 40)  # the upload's 40×30, one target

    npy = client.explain("tiny", image, method="saliency", format="npy", seed=SEED)
    assert npy.array is not None and npy.array.dtype == np.float32 and npy.target == js.target
    np.testing.assert_allclose(npy.array, js.array, rtol=1e-3, atol=1e-4 * float(np.abs(npy.array).max()))

    overlay = client.explain("tiny", image, method="saliency", format="overlay", seed=SEED)
    assert overlay.image is not None and overlay.target == js.target
    assert Image.open(io.BytesIO(overlay.image)).size == (40, 30)

    # the JSON layer echo is the model's default CAM layer; an explicit one is honoured
    cam = client.explain("tiny", image, method="gradcam", top_k=2)
    assert cam.parameters is not None and cam.parameters["layer"] == client.model("tiny").target_layer
    assert cam.array is not None and cam.array.shape == (2, 30, 40)
    assert [h.target.index for h in cam.explanations] == [p.index for p in pred.predictions[:2]]


def test_compare_and_evaluate(client: Client) -> None:
    image = png(1)
    both = client.compare("tiny", image, methods=["saliency", "gradcam"], format="json", seed=SEED)
    assert both.methods == ["saliency", "gradcam"]
    alone = client.explain("tiny", image, method="saliency", seed=SEED)
    assert both.results[0].array is not None and alone.array is not None
    np.testing.assert_allclose(both.results[0].array, alone.array, atol=1e-4)
    grid = client.compare("tiny", image, methods=["saliency", "gradcam"])
    assert grid.image is not None and grid.image.startswith(b"\x89PNG")

    ev = client.evaluate("tiny", image, methods=["gradcam", "saliency"], curve_steps=4, seed=SEED)
    assert [r.method for r in ev.results] == ["gradcam", "saliency"]
    for r in ev.results:
        assert r.curves is not None and len(r.curves["deletion"]) == 5
        assert r.deletion_auc is not None and 0.0 <= r.deletion_auc <= 1.0 and r.random is not None
    plot = client.evaluate("tiny", image, curve_steps=4, format="png")
    assert plot.image is not None and plot.image.startswith(b"\x89PNG")


def test_job_round_trip_matches_synchronous_explain(client: Client) -> None:
    images = [png(2), png(3)]
    job = client.submit_job("tiny", images, method="saliency", seed=SEED, normalize="none")
    assert job.status in ("queued", "running", "succeeded") and job.images == 2
    seen: list[Job] = []
    done = client.wait(job, progress=seen.append, poll_interval=0.05, timeout=120)
    assert done.status == "succeeded" and seen[-1].status == "succeeded"
    progress = [j.progress for j in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0

    result = client.result(done)
    assert [h.image_index for h in result.explanations] == [0, 1]
    for i, image in enumerate(images):
        sync = client.explain("tiny", image, method="saliency", seed=SEED, normalize="none")
        assert sync.array is not None
        np.testing.assert_allclose(result.explanations[i].heatmap, sync.array[0], rtol=1e-3, atol=1e-6)
    one = client.result(done.id, format="npy", index=1)
    assert one.array is not None
    np.testing.assert_allclose(one.array[0], result.explanations[1].heatmap, rtol=1e-3, atol=1e-6)


def test_cancelled_job_and_job_errors(client: Client) -> None:
    heavy = client.submit_job(
        "tiny", [png(i) for i in range(4)], method="integrated_gradients", steps=512, seed=SEED
    )
    cancelled = client.cancel(heavy)
    assert cancelled.id == heavy.id and cancelled.status == "cancelled"
    with pytest.raises(JobFailed) as failed:
        client.wait(heavy, poll_interval=0.05, timeout=60)
    assert failed.value.job.status == "cancelled"
    with pytest.raises(Conflict) as conflict:
        client.result(heavy)
    assert conflict.value.status == 409
    with pytest.raises(NotFound):
        client.job("0" * 32)


def test_problems_are_typed_exceptions(client: Client, url: str) -> None:
    with pytest.raises(NotFound) as unknown:
        client.explain("nope", png(0))
    assert (
        unknown.value.status == 404
        and unknown.value.code == "unknown-model"
        and "tiny" in unknown.value.detail
    )
    assert unknown.value.request_id

    with pytest.raises(Unprocessable) as bad:
        client.explain("tiny", png(0), method="integrated_gradients", steps=100_000)
    assert bad.value.status == 422 and "steps" in bad.value.fields()

    with pytest.raises(UnsupportedMediaType) as garbage:
        client.explain("tiny", b"not an image at all")
    assert garbage.value.status == 415 and garbage.value.type.endswith("unsupported-media-type")

    with (
        Client(url, api_key="wrong-key-0123456789", retries=0) as wrong,
        pytest.raises(Unauthorized) as denied,
    ):
        wrong.models()
    assert denied.value.status == 401


def test_async_client_round_trip(url: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(url, api_key=CLIENT_TEST_KEY, timeout=120) as c:
            [info] = await c.models()
            layers = await c.layers("tiny")
            methods = await c.methods()
            assert info.name == "tiny" and any(layer.default for layer in layers) and methods
            pred = await c.predict("tiny", png(4))
            js = await c.explain("tiny", png(4), method="saliency", seed=SEED)
            npy = await c.explain("tiny", png(4), method="saliency", format="npy", seed=SEED)
            assert js.target is not None and js.target.index == pred.predictions[0].index
            assert npy.array is not None and npy.array.shape == (1, 30, 40)
            comp = await c.compare("tiny", png(4), methods=["saliency"], format="json", seed=SEED)
            assert comp.results[0].array is not None and js.array is not None
            np.testing.assert_allclose(comp.results[0].array, js.array, atol=1e-4)
            ev = await c.evaluate("tiny", png(4), curve_steps=3, seed=SEED)
            assert ev.results[0].method == "gradcam"

            polled: list[float] = []

            async def progress(job: Job) -> None:
                polled.append(job.progress)

            job = await c.submit_job("tiny", [png(4)], method="saliency", seed=SEED)
            done = await c.wait(job, progress=progress, poll_interval=0.05, timeout=120)
            assert done.status == "succeeded" and polled[-1] == 1.0
            result = await c.result(done)
            assert result.array is not None and js.array is not None
            np.testing.assert_allclose(result.array, js.array, atol=1e-4)
            cancelled = await c.cancel(done)  # a finished job is unchanged
            assert cancelled.status == "succeeded"

            with pytest.raises(NotFound):
                await c.layers("nope")
            with pytest.raises(Unprocessable) as bad:
                await c.explain("tiny", png(4), target=99)
            assert bad.value.fields().keys() == {"target"}

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------
# retries: a tiny server that says "later" before it answers
# ------------------------------------------------------------------------------------------------
class Flaky:
    """Answers ``GET /v1/models`` with ``refusals`` problems (``status``, ``Retry-After`` if
    given), then 200; records when each request came."""

    def __init__(self) -> None:
        self.script: list[Response] = []
        self.times: list[float] = []

    async def models(self, request: Request) -> Response:
        self.times.append(time.monotonic())
        if self.script:
            return self.script.pop(0)
        return JSONResponse({"models": []})

    def refuse(self, status: int, times: int, retry_after: str | None) -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        body = {
            "type": "urn:saliency:problem:overloaded",
            "title": "later",
            "status": status,
            "detail": "busy",
        }
        self.script = [
            JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")
            for _ in range(times)
        ]
        self.times = []


@pytest.fixture(scope="module")
def flaky() -> Iterator[tuple[str, Flaky]]:
    state = Flaky()
    app = Starlette(routes=[Route("/v1/models", state.models)])
    with live_server(app, ready_path=None) as base:
        yield base, state


def test_retries_honour_retry_after(flaky: tuple[str, Flaky]) -> None:
    base, state = flaky
    state.refuse(503, 1, "1")
    with Client(base) as c:
        assert c.models() == []
    assert len(state.times) == 2 and state.times[1] - state.times[0] >= 0.95  # waited as told

    state.refuse(429, 2, None)  # no Retry-After: exponential back-off (0.05, 0.1 s, jittered)
    with Client(base, backoff=0.05) as c:
        assert c.models() == []
    assert len(state.times) == 3

    state.refuse(503, 3, "0")
    with Client(base, retries=2) as c, pytest.raises(ServiceUnavailable) as gave_up:
        c.models()
    assert len(state.times) == 3 and gave_up.value.retry_after == 0 and gave_up.value.detail == "busy"

    state.refuse(429, 1, "120")  # longer than max_backoff: raised at once, carrying the hint
    with Client(base) as c, pytest.raises(RateLimited) as limited:
        c.models()
    assert len(state.times) == 1 and limited.value.retry_after == 120


def test_async_retries(flaky: tuple[str, Flaky]) -> None:
    base, state = flaky
    state.refuse(503, 2, "0")

    async def call() -> None:
        async with AsyncClient(base) as c:
            assert await c.models() == []

    asyncio.run(call())
    assert len(state.times) == 3


def test_the_readme_example_runs(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Python client", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    literal = 'Client("http://127.0.0.1:8000", api_key=None, timeout=60)'
    assert literal in code
    exec(code.replace(literal, f"Client({url!r}, api_key={CLIENT_TEST_KEY!r}, timeout=120)"), {})
    out = capsys.readouterr().out
    assert "(1, 300, 451)" in out and "succeeded 100%" in out and "404 unknown-model" in out
