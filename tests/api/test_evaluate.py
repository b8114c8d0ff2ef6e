"""``POST /v1/models/{model}/evaluate``, ``score=true`` on explain and jobs with ``task=evaluate``:
the numbers the engine computes reach the client, the plot is a plot, bad values are 422."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from api_helpers import decode_png, encode, sample_image, upload, wait_for_job
from fastapi.testclient import TestClient

from service.evaluation.curves import auc
from service.imaging.plot import DPI, HEIGHT_IN, WIDTH_IN

pytestmark = pytest.mark.api

EVALUATE = "/v1/models/tiny/evaluate"


def problem(r: Any, status: int = 422) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["detail"]
    return body


def test_default_is_deletion_and_insertion_json(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(EVALUATE, files=upload(png_bytes), data={"curve_steps": "8", "seed": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"model", "target", "results", "parameters"}
    assert body["parameters"]["seed"] == 3 and body["parameters"]["curve_steps"] == 8
    [res] = body["results"]
    assert res["method"] == "gradcam"
    assert set(res) == {"method", "deletion_auc", "insertion_auc", "random", "curves"}
    for kind in ("deletion", "insertion"):
        curve = res["curves"][kind]
        assert len(curve) == 9 and all(0.0 <= p <= 1.0 for p in curve)
        assert res[f"{kind}_auc"] == pytest.approx(np.trapezoid(curve, dx=1 / 8), abs=1e-5)
    # deletion starts, and insertion ends, at the unchanged image: the target's score
    assert res["curves"]["deletion"][0] == pytest.approx(body["target"]["score"], abs=1e-4)
    assert res["curves"]["insertion"][-1] == pytest.approx(body["target"]["score"], abs=1e-4)
    # the same request gives the same numbers (the seed fixes the random map)
    again = client.post(EVALUATE, files=upload(png_bytes), data={"curve_steps": "8", "seed": "3"}).json()
    assert again["results"] == body["results"]


def test_every_metric_for_two_methods(client: TestClient, png_bytes: bytes) -> None:
    data = {
        "methods": "gradcam,saliency",
        "metrics": "deletion,insertion,pointing,sanity",
        "curve_steps": "4",
        "box": "10,10,40,30",
        "target": "2",
        "substitute": "mean",
    }
    r = client.post(EVALUATE, files=upload(png_bytes), data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["target"]["index"] == 2
    assert [x["method"] for x in body["results"]] == ["gradcam", "saliency"]
    for res in body["results"]:
        assert isinstance(res["pointing"]["hit"], bool)
        x, y = res["pointing"]["peak"]
        assert 0 <= x < 80 and 0 <= y < 50  # in the upload's pixels (80×50), not the model's
        layers = res["sanity"]["layers"]
        assert layers[0] == "fc" and layers[-1] == "conv1"
        assert len(res["sanity"]["spearman"]) == len(layers)
    # the random map is the same chance baseline for both methods
    assert body["results"][0]["random"] == body["results"][1]["random"]


def test_only_asked_metrics_are_present(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(EVALUATE, files=upload(png_bytes), data={"metrics": "pointing", "box": "0,0,80,50"})
    assert r.status_code == 200, r.text
    [res] = r.json()["results"]
    assert set(res) == {"method", "pointing"}
    assert res["pointing"]["hit"] is True  # the whole image


def test_png_is_a_plot(client: TestClient, png_bytes: bytes) -> None:
    data = {"methods": "gradcam,saliency", "curve_steps": "5", "format": "png"}
    r = client.post(EVALUATE, files=upload(png_bytes), data=data)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    image = decode_png(r.content)
    assert image.size == (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))
    pixels = np.asarray(image)
    assert (pixels < 100).any() and (pixels > 250).any()  # lines drawn on a white canvas


def test_served_model_untouched_by_sanity(client: TestClient, png_bytes: bytes) -> None:
    handle = client.app.state.services.registry.get("tiny").handle  # type: ignore[attr-defined]
    before = {k: v.clone() for k, v in handle.module.state_dict().items()}
    r = client.post(EVALUATE, files=upload(png_bytes), data={"metrics": "sanity", "methods": "gradcam"})
    assert r.status_code == 200, r.text
    after = handle.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._backward_hooks for m in handle.module.modules())


def test_score_on_explain_adds_the_aucs(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(
        "/v1/models/tiny/explain",
        files=upload(png_bytes),
        data={"format": "json", "score": "true", "top_k": "2"},
    )
    assert r.status_code == 200, r.text
    entries = r.json()["explanations"]
    assert len(entries) == 2
    for e in entries:
        assert 0.0 <= e["deletion_auc"] <= 1.0 and 0.0 <= e["insertion_auc"] <= 1.0
    # the evaluate route's AUC for the same class (its map ran alone, not beside a second target:
    # rounding may reorder a few near-tied pixels)
    target = entries[0]["target"]["index"]
    ev = client.post(EVALUATE, files=upload(png_bytes), data={"target": str(target)}).json()
    assert ev["results"][0]["deletion_auc"] == pytest.approx(entries[0]["deletion_auc"], abs=1e-4)
    assert ev["results"][0]["insertion_auc"] == pytest.approx(entries[0]["insertion_auc"], abs=1e-4)
    plain = client.post("/v1/models/tiny/explain", files=upload(png_bytes), data={"format": "json"}).json()
    assert "deletion_auc" not in plain["explanations"][0]


def test_methods_say_whether_the_sanity_check_applies(client: TestClient) -> None:
    methods = client.get("/v1/methods").json()["methods"]
    assert all(isinstance(m["sanity_check"], bool) for m in methods)
    assert {m["name"]: m["sanity_check"] for m in methods}["gradcam"] is True


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"metrics": "pointing", "box": "0,0,81,50"}, "box"),  # the upload is 80×50
        ({"metrics": "pointing", "box": "0,0,80,51"}, "box"),
        ({"metrics": "pointing", "box": "40,10,20,30"}, "box"),  # inverted
        ({"metrics": "pointing", "box": "10,30,40,30"}, "box"),  # empty
        ({"metrics": "pointing", "box": "a,b,c,d"}, "box"),
        ({"metrics": "pointing"}, "box"),  # pointing without a box
        ({"metrics": "deletion,accuracy"}, "metrics"),
        ({"curve_steps": "1"}, "curve_steps"),
        ({"curve_steps": "225"}, "curve_steps"),
        ({"curve_steps": "many"}, "curve_steps"),
        ({"substitute": "white"}, "substitute"),
        ({"methods": "gradcam,nope"}, "method"),  # UnknownMethod names the field it knows
        ({"top_k": "2"}, "top_k"),
        ({"target": "10"}, "target"),
        ({"metrics": "pointing", "box": "0,0,9,9", "format": "png"}, "format"),
        ({"format": "npy"}, "format"),
        ({"bogus": "1"}, "bogus"),
    ],
)
def test_bad_values_are_422(client: TestClient, png_bytes: bytes, data: dict[str, str], field: str) -> None:
    body = problem(client.post(EVALUATE, files=upload(png_bytes), data=data))
    fields = [e["field"] for e in body["errors"]]
    assert any(field in f for f in fields), body


def test_too_heavy_points_to_jobs(client: TestClient, png_bytes: bytes) -> None:
    data = {"methods": "integrated_gradients", "steps": "512", "metrics": "sanity"}  # 512 × (1 + 11 blocks)
    body = problem(client.post(EVALUATE, files=upload(png_bytes), data=data))
    assert "/v1/jobs" in body["detail"]


def test_score_needs_json(client: TestClient, png_bytes: bytes) -> None:
    problem(client.post("/v1/models/tiny/explain", files=upload(png_bytes), data={"score": "true"}))


# ------------------------------------------------------------------------------------------------
# jobs
# ------------------------------------------------------------------------------------------------
def wait_done(client: TestClient, job_id: str) -> dict[str, Any]:
    return wait_for_job(client, job_id, "succeeded", "failed", "cancelled")


def test_evaluate_job_scores_every_image_with_mean_and_std(client: TestClient) -> None:
    images = [encode(sample_image(w, h, seed=i)) for i, (w, h) in enumerate([(80, 50), (48, 72), (64, 64)])]
    files = [("images", (f"i{i}.png", b, "image/png")) for i, b in enumerate(images)]
    data = {
        "model": "tiny",
        "task": "evaluate",
        "methods": "gradcam,saliency",
        "curve_steps": "6",
        "seed": "5",
    }
    r = client.post("/v1/jobs", files=files, data=data)
    assert r.status_code == 202, r.text
    job = wait_done(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    body = client.get(f"/v1/jobs/{job['id']}/result").json()
    assert body["task"] == "evaluate" and body["methods"] == ["gradcam", "saliency"]
    assert [im["image_index"] for im in body["images"]] == [0, 1, 2]
    for method in ("gradcam", "saliency"):
        values = [
            next(e for e in im["results"] if e["method"] == method)["deletion_auc"] for im in body["images"]
        ]
        stats = body["summary"][method]["deletion_auc"]
        assert stats["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert stats["std"] == pytest.approx(np.std(values), abs=1e-6)
        assert stats["n"] == 3
    # an image's scores are the synchronous route's for the same image, target and seed
    first = body["images"][0]
    sync = client.post(
        EVALUATE,
        files=upload(images[0]),
        data={
            "methods": "gradcam,saliency",
            "curve_steps": "6",
            "seed": "5",
            "target": str(first["target"]["index"]),
        },
    ).json()
    for e, s in zip(first["results"], sync["results"], strict=True):
        assert e["deletion_auc"] == pytest.approx(s["deletion_auc"], abs=1e-5)
        assert e["random"] == pytest.approx(s["random"], abs=1e-5)
        assert auc(s["curves"]["insertion"]) == pytest.approx(e["insertion_auc"], abs=1e-5)
    problem(client.get(f"/v1/jobs/{job['id']}/result", params={"format": "png"}))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"metrics": "pointing", "box": "0,0,5,5"}, "metrics"),
        ({"curve_steps": "300"}, "curve_steps"),
        ({"score": "true"}, "score"),
        ({"task": "grade"}, "task"),
    ],
)
def test_bad_evaluate_jobs_are_422(
    client: TestClient, png_bytes: bytes, data: dict[str, str], field: str
) -> None:
    files = [("images", ("a.png", png_bytes, "image/png"))]
    body = problem(client.post("/v1/jobs", files=files, data={"model": "tiny", "task": "evaluate", **data}))
    assert any(field in e["field"] for e in body["errors"]), body
