"""A battery of bad requests: each gets its 4xx problem+json, nothing is a 500, and the service
still answers correctly afterwards."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from api_helpers import LABELS, decode_png, encode, make_settings, sample_image, upload, wait_ready
from fastapi.testclient import TestClient
from PIL import Image

from service.api import pipeline
from service.app import create_app
from service.errors import DeadlineExceeded, Overloaded
from service.explainers import method_names

EXPLAIN = "/v1/models/tiny/explain"
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance"}


def assert_problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers.get("X-Request-ID")
    body: dict[str, Any] = r.json()
    assert set(body) >= PROBLEM_KEYS
    assert body["status"] == status
    assert isinstance(body["detail"], str) and body["detail"]
    if status == 422:
        assert isinstance(body["errors"], list)
    return body


@pytest.fixture
def still_healthy(client: TestClient, png_bytes: bytes) -> Iterator[None]:
    yield
    r = client.post(EXPLAIN, files=upload(png_bytes), data={"format": "json"})
    assert r.status_code == 200, r.text
    assert r.json()["explanations"][0]["shape"] == [50, 80]


# ------------------------------------------------------------------------------------------------
# bad bytes
# ------------------------------------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring width×height pixels, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    return encode(image)


def cmyk_jpeg() -> bytes:
    image = sample_image(64, 48).convert("CMYK")
    assert image.mode == "CMYK"
    return encode(image, "JPEG", quality=95)


BAD_BYTES = [
    pytest.param(
        b"this is plain text, not an image\n" * 4, 415, "unsupported-media-type", id="text-as-image"
    ),
    pytest.param(encode(sample_image(), "JPEG")[:300], 422, "corrupt-image", id="truncated-jpeg"),
    pytest.param(png_bomb(), 413, "image-too-large", id="png-bomb"),
    pytest.param(encode(Image.new("RGB", (1, 1), (9, 9, 9))), 422, "image-too-small", id="1x1"),
    pytest.param(b"", 422, "corrupt-image", id="empty-file"),
    pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 422, "corrupt-image", id="broken-png-header"),
]


@pytest.mark.parametrize(("data", "status", "code"), BAD_BYTES)
@pytest.mark.usefixtures("still_healthy")
def test_bad_image_bytes(client: TestClient, data: bytes, status: int, code: str) -> None:
    for route in ("explain", "predict", "compare"):
        r = client.post(f"/v1/models/tiny/{route}", files=upload(data))
        body = assert_problem(r, status)
        assert body["type"].endswith(code)


@pytest.mark.parametrize(
    "data", [pytest.param(sixteen_bit_png(), id="16-bit-png"), pytest.param(cmyk_jpeg(), id="cmyk-jpeg")]
)
def test_unusual_modes_are_converted_and_explained(client: TestClient, data: bytes) -> None:
    r = client.post(EXPLAIN, files=upload(data), data={"format": "json"})
    assert r.status_code == 200, r.text
    assert r.json()["explanations"][0]["shape"] == [48, 64]
    png = client.post(
        EXPLAIN, files=upload(data, "x.bin", "application/octet-stream"), data={"format": "overlay"}
    )
    assert png.status_code == 200
    assert decode_png(png.content).size == (64, 48)


# ------------------------------------------------------------------------------------------------
# bad requests
# ------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("still_healthy")
def test_empty_body(client: TestClient) -> None:
    body = assert_problem(client.post(EXPLAIN), 422)
    assert [e["field"] for e in body["errors"]] == ["image"]
    assert_problem(client.post(EXPLAIN, json={}), 422)
    assert_problem(client.post(EXPLAIN, content=b"", headers={"content-type": "application/json"}), 422)


@pytest.mark.usefixtures("still_healthy")
def test_wrong_field_names(client: TestClient, png_bytes: bytes) -> None:
    body = assert_problem(client.post(EXPLAIN, files={"file": ("a.png", png_bytes, "image/png")}), 422)
    fields = {e["field"] for e in body["errors"]}
    assert fields == {"file", "image"}
    body = assert_problem(client.post(EXPLAIN, files=upload(png_bytes), data={"stepz": "4"}), 422)
    assert [e["field"] for e in body["errors"]] == ["stepz"]
    body = assert_problem(client.post(EXPLAIN, data={"image": "not a file"}), 422)
    assert body["errors"][0]["field"] == "image"
    body = assert_problem(client.post(EXPLAIN, json={"images": ["aGVsbG8="]}), 422)
    assert {e["field"] for e in body["errors"]} == {"image", "images"}


@pytest.mark.usefixtures("still_healthy")
def test_bad_json_bodies(client: TestClient) -> None:
    bad = {"content-type": "application/json"}
    assert_problem(client.post(EXPLAIN, content=b"{not json", headers=bad), 422)
    assert_problem(client.post(EXPLAIN, content=b"[1, 2]", headers=bad), 422)
    body = assert_problem(client.post(EXPLAIN, json={"image": "***not base64***"}), 422)
    assert body["errors"][0]["field"] == "image"
    assert_problem(client.post(EXPLAIN, json={"image": 12}), 422)
    # valid base64 of text: decodes, then is no image
    assert_problem(client.post(EXPLAIN, json={"image": "aGVsbG8gd29ybGQ="}), 415)


@pytest.mark.usefixtures("still_healthy")
def test_unsupported_content_type(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(EXPLAIN, content=png_bytes, headers={"content-type": "text/plain"})
    assert_problem(r, 415)


ABSURD = [
    ({"steps": "100000"}, "steps"),
    ({"steps": "0"}, "steps"),
    ({"samples": "100000"}, "samples"),
    ({"samples": "-1"}, "samples"),
    ({"method": "smoothgrad", "samples": "257"}, "samples"),  # the noise methods' own bound
    ({"method": "lime", "samples": "5000"}, "samples"),
    ({"method": "kernel_shap", "segments": "1"}, "segments"),
    ({"method": "kernel_shap", "segments": "100000"}, "segments"),
    ({"noise_level": "abc"}, "noise_level"),
    ({"noise_level": "5"}, "noise_level"),
    ({"alpha": "7"}, "alpha"),
    ({"alpha": "nan"}, "alpha"),
    ({"top_k": "0"}, "top_k"),
    ({"top_k": "1000000"}, "top_k"),
    ({"target": "-1"}, "target"),
    ({"target": "1.5"}, "target"),
    ({"seed": "-3"}, "seed"),
    ({"seed": str(2**70)}, "seed"),
    ({"batch_size": "0"}, "batch_size"),
    ({"batch_size": "99999999"}, "batch_size"),
    ({"baseline": "purple"}, "baseline"),
    ({"rule": "simpson"}, "rule"),
    ({"head_fusion": "bogus"}, "head_fusion"),
    ({"discard_ratio": "1"}, "discard_ratio"),
    ({"legrad_layers": "0"}, "legrad_layers"),
    ({"method": "occlusion", "window": "0"}, "window"),
    ({"method": "occlusion", "window": "1000"}, "window"),  # wider than the model's input
    ({"method": "occlusion", "stride": "0"}, "stride"),
    ({"method": "rise", "masks": "0"}, "masks"),
    ({"method": "rise", "masks": "100000000"}, "masks"),
    ({"method": "rise", "mask_cells": "0"}, "mask_cells"),
    ({"method": "rise", "mask_p": "0"}, "mask_p"),
    ({"method": "rise", "mask_p": "1.5"}, "mask_p"),
    ({"method": "blur_ig", "max_sigma": "0"}, "max_sigma"),
    ({"method": "blur_ig", "max_sigma": "1e9"}, "max_sigma"),
    ({"method": "blur_ig", "max_sigma": "nan"}, "max_sigma"),
    ({"method": "guided_ig", "fraction": "0"}, "fraction"),
    ({"method": "guided_ig", "fraction": "1.5"}, "fraction"),
    ({"method": "guided_ig", "max_dist": "-0.1"}, "max_dist"),
    ({"method": "guided_ig", "max_dist": "2"}, "max_dist"),
    ({"colormap": "rainbow"}, "colormap"),
    ({"method": "gradcam", "colormap": "rgb"}, "colormap"),
    ({"polarity": "sideways"}, "polarity"),
    ({"clip_upper": "101"}, "clip_upper"),
    ({"clip_upper": "nan"}, "clip_upper"),
    ({"clip_lower": "-5"}, "clip_lower"),
    ({"clip_lower": "60", "clip_upper": "40"}, "clip_lower"),
    ({"method": "integrated_gradients", "clip_lower": "99.5"}, "clip_lower"),
    ({"style": "sketch"}, "style"),
    ({"keep": "1.5"}, "keep"),
    ({"smooth": "-1"}, "smooth"),
    ({"smooth": "1000"}, "smooth"),
    ({"format": "gif"}, "format"),
    ({"resolution": "huge"}, "resolution"),
    ({"reduction": "median"}, "reduction"),
    ({"normalize": "zscore"}, "normalize"),
    ({"target": "3", "top_k": "2"}, "top_k"),
    ({"precision": "fp16"}, "precision"),
    ({"precision": "bf16", "method": "occlusion"}, "precision"),  # bf16 fidelity not measured
]


@pytest.mark.parametrize(
    ("data", "field"), ABSURD, ids=["&".join(f"{k}={v}" for k, v in d.items()) for d, _ in ABSURD]
)
@pytest.mark.usefixtures("still_healthy")
def test_absurd_parameter_values(
    client: TestClient, png_bytes: bytes, data: dict[str, str], field: str
) -> None:
    body = assert_problem(client.post(EXPLAIN, files=upload(png_bytes), data=data), 422)
    assert field in {e["field"] for e in body["errors"]}, body


@pytest.mark.usefixtures("still_healthy")
def test_unknown_model_method_layer(client: TestClient, png_bytes: bytes) -> None:
    body = assert_problem(client.post("/v1/models/nope/explain", files=upload(png_bytes)), 404)
    assert "tiny" in body["detail"] and "tiny_crop" in body["detail"]
    assert_problem(client.get("/v1/models/nope"), 404)
    body = assert_problem(client.post(EXPLAIN, files=upload(png_bytes), data={"method": "magic"}), 422)
    assert all(name in body["detail"] for name in method_names())
    assert body["errors"][0]["field"] == "method"
    body = assert_problem(client.post(EXPLAIN, files=upload(png_bytes), data={"layer": "layer9"}), 422)
    assert "layer4" in body["detail"] and body["errors"][0]["field"] == "layer"
    body = assert_problem(
        client.post("/v1/models/tiny/compare", files=upload(png_bytes), data={"methods": "gradcam,magic"}),
        422,
    )
    assert "magic" in body["detail"]
    body = assert_problem(client.post(EXPLAIN, files=upload(png_bytes), data={"method": "legrad"}), 422)
    assert body["errors"][0]["field"] == "method" and "legrad" in body["detail"]


@pytest.mark.usefixtures("still_healthy")
def test_target_out_of_range(client: TestClient, png_bytes: bytes) -> None:
    body = assert_problem(
        client.post(EXPLAIN, files=upload(png_bytes), data={"target": str(len(LABELS))}), 422
    )
    assert body["type"].endswith("target-out-of-range")
    assert body["errors"][0]["field"] == "target"
    assert_problem(client.post("/v1/models/tiny/predict", files=upload(png_bytes), data={"top_k": "11"}), 422)


@pytest.mark.usefixtures("still_healthy")
def test_accept_negotiation(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(EXPLAIN, files=upload(png_bytes), headers={"accept": "text/html"})
    body = assert_problem(r, 406)
    assert "image/png" in body["detail"]
    assert_problem(
        client.post("/v1/models/tiny/predict", files=upload(png_bytes), headers={"accept": "image/png"}), 406
    )
    cases = {
        "application/json": "application/json",
        "application/x-npy": "application/x-npy",
        "image/*": "image/png",
        "*/*": "image/png",
        "text/html, application/json;q=0.5": "application/json",
        "image/png;q=0.2, application/json;q=0.9": "application/json",
        "application/json;q=0, */*": "image/png",
    }
    for accept, media in cases.items():
        r = client.post(EXPLAIN, files=upload(png_bytes), headers={"accept": accept})
        assert r.status_code == 200 and r.headers["content-type"] == media, accept
    # format wins over Accept
    r = client.post(EXPLAIN, files=upload(png_bytes), data={"format": "npy"}, headers={"accept": "image/png"})
    assert r.headers["content-type"] == "application/x-npy"
    r = client.post(
        EXPLAIN, files=upload(png_bytes), data={"format": "json"}, headers={"accept": "text/html"}
    )
    assert r.status_code == 200


@pytest.mark.usefixtures("still_healthy")
def test_too_heavy_for_a_synchronous_request_points_to_jobs(client: TestClient, png_bytes: bytes) -> None:
    data = {"method": "integrated_gradients", "steps": "512", "top_k": "10"}  # 5120 passes > 4096
    body = assert_problem(client.post(EXPLAIN, files=upload(png_bytes), data=data), 422)
    assert body["type"].endswith("too-heavy") and "/v1/jobs" in body["detail"]


@pytest.mark.usefixtures("still_healthy")
def test_unknown_route_and_method_not_allowed(client: TestClient) -> None:
    body = assert_problem(client.get("/v1/nothing-here"), 404)
    assert body["type"] == "about:blank"
    r = client.delete("/v1/models")
    assert_problem(r, 405)
    assert "GET" in r.headers["allow"]
    assert_problem(client.get("/v1/models/tiny/explain"), 405)


def test_request_id_is_echoed_or_made(client: TestClient, png_bytes: bytes) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    made = client.get("/healthz").headers["X-Request-ID"]
    assert len(made) >= 16
    r = client.post("/v1/models/nope/explain", files=upload(png_bytes), headers={"X-Request-ID": "err-1"})
    assert r.headers["X-Request-ID"] == "err-1"
    # an id that could break logs or headers is replaced
    assert client.get("/healthz", headers={"X-Request-ID": "a b\tc"}).headers["X-Request-ID"] != "a b\tc"


# ------------------------------------------------------------------------------------------------
# limits, overload, deadlines, bugs
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_client(tiny_config: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(tiny_config, max_upload_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def test_upload_over_the_limit_is_413(small_client: TestClient) -> None:
    big = encode(sample_image(400, 300, seed=1))  # ~300 kB of noisy PNG
    assert len(big) > 100_000
    assert_problem(small_client.post(EXPLAIN, files=upload(big)), 413)  # Content-Length over the body limit
    # a file under the body limit but over the upload limit
    medium = encode(sample_image(80, 60, seed=2))
    assert 4096 < len(medium) < 60_000
    assert_problem(small_client.post(EXPLAIN, files=upload(medium)), 413)


def test_streamed_body_without_length_is_counted(small_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"image": "'
        for _ in range(200):
            yield b"A" * 1024
        yield b'"}'

    r = small_client.post(EXPLAIN, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_problem(r, 413)
    small = encode(sample_image(16, 16))
    assert small_client.post(EXPLAIN, files=upload(small)).status_code == 200


def test_overloaded_is_503_with_retry_after(
    client: TestClient, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = client.app.state.services.executor  # type: ignore[attr-defined]

    async def full(*args: Any, **kwargs: Any) -> Any:
        raise Overloaded("queue full", retry_after=3)

    monkeypatch.setattr(executor, "explain", full)
    r = client.post(EXPLAIN, files=upload(png_bytes))
    assert_problem(r, 503)
    assert r.headers["Retry-After"] == "3"


def test_deadline_is_504(client: TestClient, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    executor = client.app.state.services.executor  # type: ignore[attr-defined]

    async def late(*args: Any, **kwargs: Any) -> Any:
        raise DeadlineExceeded("too slow")

    monkeypatch.setattr(executor, "predict", late)
    assert_problem(client.post("/v1/models/tiny/predict", files=upload(png_bytes)), 504)


def test_a_bug_is_a_500_without_internals(
    client: TestClient, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail in /opt/private/path.py")

    monkeypatch.setattr(pipeline, "explain", boom)
    r = client.post(EXPLAIN, files=upload(png_bytes), headers={"X-Request-ID": "bug-1"})
    body = assert_problem(r, 500)
    assert r.headers["X-Request-ID"] == "bug-1"
    assert "secret" not in r.text and "/opt" not in r.text and "Traceback" not in r.text
    assert body["type"].endswith("internal-error")
    monkeypatch.undo()
    assert client.post(EXPLAIN, files=upload(png_bytes)).status_code == 200


def test_no_5xx_for_random_bytes(client: TestClient) -> None:
    rng = np.random.default_rng(5)
    prefixes = [
        b"",
        b"\xff\xd8\xff",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"BM",
        b"II*\x00",
        b"RIFF\x00\x00\x00\x00WEBP",
    ]
    for i in range(21):
        data = prefixes[i % len(prefixes)] + rng.bytes(int(rng.integers(1, 2000)))
        r = client.post("/v1/models/tiny/predict", files=upload(data))
        assert 400 <= r.status_code < 500, (i, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    assert client.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------------------------
# hostile requests (issue: safe to expose): each a 4xx problem, nothing held afterwards
# ------------------------------------------------------------------------------------------------
def rle_bmp(width: int = 4000, height: int = 4000) -> bytes:
    """A 256-colour BMP with RLE8 compression (Pillow decodes it in pure Python)."""
    rle = b"\x00\x00" * (height - 1) + b"\x00\x01"  # an empty line each, then end of bitmap
    palette = b"\x00\x00\x00\x00" * 256
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rle), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset) + info + palette + rle


def one_bit_png(width: int, height: int) -> bytes:
    """A tiny file of many pixels: a one-bit PNG of ``width`` × ``height``, stripes."""
    image = Image.new("1", (width, height))
    image.paste(1, (0, 0, width, height // 2))
    return encode(image, optimize=True)


@pytest.mark.usefixtures("still_healthy")
def test_json_nesting_members_and_form_fields_are_bounded(client: TestClient) -> None:
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    body = assert_problem(
        client.post(EXPLAIN, content=deep, headers={"content-type": "application/json"}), 422
    )
    assert "depth" in body["detail"] or "deeper" in body["detail"]
    nested = b'{"target": ' + b"[" * 40 + b"]" * 40 + b"}"
    body = assert_problem(
        client.post(EXPLAIN, content=nested, headers={"content-type": "application/json"}), 422
    )
    assert "deeper than 32" in body["detail"]
    wide = orjson.dumps({f"f{i}": 1 for i in range(5000)})
    body = assert_problem(
        client.post(EXPLAIN, content=wide, headers={"content-type": "application/json"}), 422
    )
    assert "at most 256 members" in body["detail"]
    fields = "&".join(f"f{i}=1" for i in range(200_000)).encode()
    r = client.post(EXPLAIN, content=fields, headers={"content-type": "application/x-www-form-urlencoded"})
    assert_problem(r, 400)
    assert "fields" in r.json()["detail"]


@pytest.mark.usefixtures("still_healthy")
def test_rle_bmp_is_refused_without_decoding(client: TestClient) -> None:
    data = rle_bmp()
    assert len(data) < 10_000
    started = time.perf_counter()
    body = assert_problem(client.post(EXPLAIN, files=upload(data, "a.bmp", "image/bmp")), 415)
    assert time.perf_counter() - started < 5.0
    assert "bmp_rle" in body["detail"]
    # an uncompressed BMP is fine
    assert (
        client.post(EXPLAIN, files=upload(encode(sample_image(), "BMP"), "a.bmp", "image/bmp")).status_code
        == 200
    )


@pytest.mark.usefixtures("still_healthy")
def test_a_response_over_the_budget_is_refused_before_any_work(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2000×2000 PNG of a few kilobytes, every class, per-channel maps at the upload's size, as
    JSON: about 1.2 GB of text. Refused as 422 response-too-large, naming the ways to shrink it,
    before the model runs."""
    data = one_bit_png(2000, 2000)
    assert len(data) < 5_000
    ran: list[int] = []
    executor = client.app.state.services.executor  # type: ignore[attr-defined]
    real = executor.explain

    async def counting(*args: Any, **kwargs: Any) -> Any:
        ran.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(executor, "explain", counting)
    form = {"method": "input_x_gradient", "top_k": "10", "reduction": "none", "format": "json"}
    body = assert_problem(client.post(EXPLAIN, files=upload(data), data=form), 422)
    assert body["type"].endswith(":response-too-large")
    for hint in ("resolution=model", "format=npy", "top_k", "reduction=sum"):
        assert hint in body["detail"]
    assert ran == []
    # shrunk as told, it is served
    r = client.post(EXPLAIN, files=upload(data), data={**form, "resolution": "model"})
    assert r.status_code == 200, r.text
    assert len(r.json()["explanations"]) == 10 and ran == [1]


def test_large_bodies_stream_and_match_the_whole_ones(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same request, built whole and streamed (the threshold lowered): identical JSON and npy."""
    from service.api import budget

    data = encode(sample_image(300, 200, seed=3))
    form = {"method": "saliency", "top_k": "3", "seed": "1"}
    whole_json = client.post(EXPLAIN, files=upload(data), data={**form, "format": "json"})
    whole_npy = client.post(EXPLAIN, files=upload(data), data={**form, "format": "npy"})
    whole_cmp = client.post(
        "/v1/models/tiny/compare", files=upload(data), data={"methods": "gradcam,saliency", "format": "json"}
    )
    monkeypatch.setattr(budget, "STREAM_BYTES", 1000)
    streamed_json = client.post(EXPLAIN, files=upload(data), data={**form, "format": "json"})
    streamed_npy = client.post(EXPLAIN, files=upload(data), data={**form, "format": "npy"})
    streamed_cmp = client.post(
        "/v1/models/tiny/compare", files=upload(data), data={"methods": "gradcam,saliency", "format": "json"}
    )
    for whole, streamed in (
        (whole_json, streamed_json),
        (whole_npy, streamed_npy),
        (whole_cmp, streamed_cmp),
    ):
        assert whole.status_code == streamed.status_code == 200, streamed.text
        assert "content-length" in whole.headers and "content-length" not in streamed.headers
    drop = {"elapsed_ms"}
    a, b = whole_json.json(), streamed_json.json()
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert np.array_equal(np.load(io.BytesIO(whole_npy.content)), np.load(io.BytesIO(streamed_npy.content)))
    ca, cb = whole_cmp.json(), streamed_cmp.json()
    assert [r["explanations"] for r in ca["results"]] == [r["explanations"] for r in cb["results"]]


def test_a_very_wide_image_costs_memory_of_the_output_not_width_times_model_height(
    client: TestClient,
) -> None:
    """A 1 000 000 × 8 one-bit PNG (~1 KB) as a Grad-CAM PNG and as JSON at its own resolution:
    served, with the NumPy memory of the request (tracemalloc follows NumPy's allocations) below
    a bound a few times the 32 MB float32 output — mapping back used to build a C × 224 × width
    intermediate (gigabytes)."""
    data = one_bit_png(1_000_000, 8)
    assert len(data) < 5_000
    for form in ({"method": "gradcam"}, {"method": "gradcam", "format": "json"}):
        tracemalloc.start()
        try:
            r = client.post(EXPLAIN, files=upload(data), data=form)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status_code == 200, r.text
        assert peak < 400 * 2**20, f"{form}: peak {peak / 2**20:.0f} MiB"
    assert r.json()["explanations"][0]["shape"] == [8, 1_000_000]


@pytest.mark.usefixtures("still_healthy")
def test_unknown_verbs_add_no_metric_series(client: TestClient) -> None:
    for verb in ("ZZ123", "BREW", "X" * 40):
        r = client.request(verb, "/healthz")
        assert 400 <= r.status_code < 500
    metrics = client.get("/metrics").text
    assert "ZZ123" not in metrics and "BREW" not in metrics
    assert 'method="other"' in metrics
    client.get(f"/no/such/path/{'q' * 30}")
    assert "qqqq" not in client.get("/metrics").text


@pytest.mark.usefixtures("still_healthy")
def test_device_out_of_memory_is_503_and_the_next_request_is_served(
    client: TestClient, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.runtime.sync import devices

    freed: list[int] = []
    real = devices.explain
    calls = {"n": 0}

    def oom_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(devices, "explain", oom_once)
    monkeypatch.setattr(devices, "free_device_memory", lambda: freed.append(1))
    r = client.post(EXPLAIN, files=upload(png_bytes))
    body = assert_problem(r, 503)
    assert body["type"].endswith(":device-out-of-memory") and int(r.headers["Retry-After"]) >= 1
    assert "20.00 GiB" not in r.text and freed == [1]
    assert client.post(EXPLAIN, files=upload(png_bytes)).status_code == 200


def test_decoding_counts_against_the_deadline(
    client: TestClient, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]
    real = pipeline._prepare_all

    def slow(*args: Any) -> Any:
        time.sleep(1.5)
        return real(*args)

    monkeypatch.setattr(services.settings, "request_timeout_s", 0.5)
    monkeypatch.setattr(pipeline, "_prepare_all", slow)
    started = time.perf_counter()
    body = assert_problem(client.post(EXPLAIN, files=upload(png_bytes)), 504)
    assert time.perf_counter() - started < 1.4
    assert "0.5 s" in body["detail"]


@pytest.mark.usefixtures("still_healthy")
def test_scorecam_is_costed_by_its_layers_channels(
    client: TestClient, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny ResNet-18's layer1 has 64 channels and layer4 512: with 200 passes allowed, the
    first fits and the second is 422 naming its 513 passes."""
    services = client.app.state.services  # type: ignore[attr-defined]
    monkeypatch.setattr(services.settings, "max_sync_passes", 200)
    ok = client.post(EXPLAIN, files=upload(png_bytes), data={"method": "scorecam", "layer": "layer1"})
    assert ok.status_code == 200, ok.text
    body = assert_problem(client.post(EXPLAIN, files=upload(png_bytes), data={"method": "scorecam"}), 422)
    assert "513 forward/backward passes" in body["detail"]


@pytest.mark.usefixtures("still_healthy")
def test_a_layer_no_method_can_use_is_refused_at_job_submission(client: TestClient, png_bytes: bytes) -> None:
    for layer in ("fc", "avgpool", "no.such.layer"):
        r = client.post(
            "/v1/jobs",
            files={"images": ("a.png", png_bytes, "image/png")},
            data={"model": "tiny", "method": "gradcam", "layer": layer},
        )
        body = assert_problem(r, 422)
        assert "layer4" in body["detail"]


# ------------------------------------------------------------------------------------------------
# the compatibility routes (KServe v1, TorchServe): the same 4xx problems, nothing a 500
# ------------------------------------------------------------------------------------------------
TINY_B64 = "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAHElEQVR42mNkYGAQIAWxMDAIMJACRjWMahg6GgCWfAIezUhyVgAAAABJRU5ErkJggg=="
KSERVE_BAD: list[Any] = [
    pytest.param(b"{not json", 422, "body", id="not-json"),
    pytest.param(b"[1, 2]", 422, "body", id="json-list"),
    pytest.param(b"null", 422, "body", id="json-null"),  # found by schemathesis: was a 500
    pytest.param(b"", 422, "instances", id="empty-body"),
    pytest.param({}, 422, "instances", id="no-instances"),
    pytest.param({"instances": []}, 422, "instances", id="empty-instances"),
    pytest.param({"instances": "abc"}, 422, "instances", id="instances-not-a-list"),
    pytest.param({"instances": ["***not base64***"]}, 422, "instances.0", id="bad-base64"),
    pytest.param({"instances": [{"image": {"b64": 12}}]}, 422, "instances.0", id="b64-not-a-string"),
    pytest.param({"instances": [[[0.1, 0.2], [0.3, 0.4]]]}, 422, "instances.0", id="tensor-instance"),
    pytest.param({"instances": [{"image": TINY_B64, "extra": 1}]}, 422, "instances.0", id="two-keys"),
    pytest.param({"instances": [{"pixels": TINY_B64}]}, 422, "instances.0", id="unknown-instance-key"),
    pytest.param({"instances": [17]}, 422, "instances.0", id="number-instance"),
    pytest.param({"instances": [TINY_B64] * 17}, 422, "instances", id="too-many-instances"),
    pytest.param({"instances": [TINY_B64], "inputs": [TINY_B64]}, 422, "inputs", id="instances-and-inputs"),
    pytest.param(
        {"instances": [TINY_B64], "signature_name": "x"}, 422, "signature_name", id="unknown-member"
    ),
    pytest.param({"instances": [TINY_B64], "parameters": [1]}, 422, "parameters", id="parameters-not-object"),
    pytest.param(
        {"instances": [TINY_B64], "parameters": {"stepz": 4}}, 422, "parameters.stepz", id="unknown-param"
    ),
    pytest.param(
        {"instances": [TINY_B64], "parameters": {"steps": 0}}, 422, "parameters.steps", id="steps-0"
    ),
    pytest.param({"instances": [TINY_B64], "parameters": {"format": "png"}}, 422, "format", id="format-png"),
    pytest.param({"instances": [TINY_B64], "parameters": {"target": 10}}, 422, "target", id="target-range"),
    pytest.param({"instances": ["aGVsbG8gd29ybGQ="]}, 415, "image", id="text-as-image"),
]


@pytest.mark.parametrize(("body", "status", "field"), KSERVE_BAD)
@pytest.mark.usefixtures("still_healthy")
def test_bad_kserve_requests(client: TestClient, body: Any, status: int, field: str) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    for verb in ("explain", "predict"):
        if verb == "predict" and field in ("format", "target"):
            continue  # explain's parameters: unknown to predict
        r = client.post(f"/v1/models/tiny:{verb}", content=raw, headers={"content-type": "application/json"})
        problem = assert_problem(r, status)
        if status == 422:
            assert field in [e["field"] for e in problem["errors"]], problem


TORCHSERVE_BAD: list[Any] = [
    pytest.param({"content": b""}, 422, "data", id="empty-body"),
    pytest.param({"content": b"plain text, not an image\n" * 4}, 415, "image", id="text-body"),
    pytest.param({"content": encode(sample_image(), "JPEG")[:300]}, 422, "image", id="truncated-jpeg"),
    pytest.param({"content": png_bomb()}, 413, "image", id="png-bomb"),
    pytest.param({"files": {"image": ("a.png", b"x")}}, 422, "image", id="wrong-file-field"),
    pytest.param({"files": {"data": (None, "not a file")}}, 422, "data", id="data-as-text-field"),
    pytest.param({"data": {"data": "not a file"}}, 415, "image", id="urlencoded-is-a-raw-body"),
    pytest.param({"params": {"stepz": "3"}}, 422, "stepz", id="unknown-param"),
    pytest.param({"params": {"method": "magic"}}, 422, "method", id="unknown-method"),
    pytest.param({"params": {"format": "png"}}, 422, "format", id="format-png"),
    pytest.param({"params": {"score": "true"}}, 422, "score", id="score"),
    pytest.param({"files": [("data", ("a.png", b"x"))] * 17}, 422, "data", id="too-many-files"),
]


@pytest.mark.parametrize(("kwargs", "status", "field"), TORCHSERVE_BAD)
@pytest.mark.usefixtures("still_healthy")
def test_bad_torchserve_requests(
    client: TestClient, png_bytes: bytes, kwargs: dict[str, Any], status: int, field: str
) -> None:
    if "content" not in kwargs and "files" not in kwargs and "data" not in kwargs:
        kwargs = {**kwargs, "content": png_bytes}
    r = client.post("/explanations/tiny", **kwargs)
    problem = assert_problem(r, status)
    if status == 422:
        assert field in [e["field"] for e in problem["errors"]], problem
