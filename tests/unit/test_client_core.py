"""``saliency_client``'s pieces that need no server: the PNG it makes of an array, ``Retry-After``
in both of its forms, the back-off bounds, problem bodies to exception classes."""

from __future__ import annotations

import email.utils
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from saliency_client import NotFound, ProblemError, RetryPolicy, ServerError, Unprocessable
from saliency_client._core import media_type, png_encode, problem, read_image, retry_after


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (5, 7, 4), (6, 4, 1)])
def test_arrays_become_pngs_that_decode_to_the_same_pixels(shape: tuple[int, ...]) -> None:
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    name, data, mime = read_image(arr)
    assert name == "image.png" and mime == "image/png" and media_type(data) == ("image/png", "png")
    back = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(back, arr.reshape(back.shape))


def test_arrays_that_are_no_images_are_refused() -> None:
    with pytest.raises(TypeError, match="uint8"):
        png_encode(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        png_encode(np.zeros((4, 4, 2), np.uint8))


def answer(code: int, headers: dict[str, str] | None = None, **body: object) -> httpx.Response:
    request = httpx.Request("GET", "http://test/v1/x")
    return httpx.Response(code, json=body or None, headers=headers, request=request)


def test_retry_after_in_seconds_and_as_a_date() -> None:
    assert retry_after(answer(503, {"Retry-After": "7"})) == 7.0
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (retry_after(answer(503, {"Retry-After": when})) or 0) <= 31
    assert retry_after(answer(503, {"Retry-After": "soon"})) is None
    assert retry_after(answer(503)) is None


def test_retry_policy_bounds() -> None:
    policy = RetryPolicy(retries=3, backoff=0.5, max_backoff=4.0)
    assert policy.delay(0, answer(503, {"Retry-After": "2"})) == 2.0
    assert policy.delay(0, answer(429, {"Retry-After": "60"})) is None  # longer than max_backoff
    assert policy.delay(3, answer(503, {"Retry-After": "1"})) is None  # attempts used up
    assert policy.delay(0, answer(500)) is None and policy.delay(0, answer(422)) is None
    for attempt in range(3):  # jittered exponential back-off within [½, 1] × min(max, backoff·2^k)
        cap = min(4.0, 0.5 * 2**attempt)
        waits = [policy.delay(attempt, answer(503)) or 0 for _ in range(50)]
        assert all(cap / 2 <= w <= cap for w in waits) and len(set(waits)) > 1


def test_problem_bodies_become_typed_exceptions() -> None:
    exc = problem(
        answer(
            422,
            {"X-Request-ID": "r1"},
            type="urn:saliency:problem:invalid-parameter",
            title="Invalid parameter",
            status=422,
            detail="bad steps",
            errors=[{"field": "steps", "message": "too many"}],
        )
    )
    assert isinstance(exc, Unprocessable) and exc.code == "invalid-parameter" and exc.request_id == "r1"
    assert exc.fields() == {"steps": "too many"} and "bad steps" in str(exc)
    assert isinstance(problem(answer(404, detail="no")), NotFound)
    plain = problem(httpx.Response(502, text="bad gateway", request=httpx.Request("GET", "http://t/")))
    assert (
        isinstance(plain, ServerError) and isinstance(plain, ProblemError) and plain.detail == "bad gateway"
    )
