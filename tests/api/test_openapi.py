"""The committed OpenAPI file is the app's, the schema follows the registry, and /docs is offline."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.explainers import method_names
from service.imaging.render import COLORMAPS

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "openapi" / "openapi.json"
IMAGE_ROUTES = ("predict", "explain", "compare")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    generated: dict[str, Any] = create_app(Settings(models_config=None)).openapi()
    return json.loads(json.dumps(generated))  # as it is served: plain JSON types


def test_committed_openapi_file_matches_the_app(spec: dict[str, Any]) -> None:
    committed = json.loads(COMMITTED.read_text())
    assert committed == spec, (
        "openapi/openapi.json is stale: run `make openapi` (saliency openapi > openapi/openapi.json)"
    )


def test_contract_paths_are_documented(spec: dict[str, Any]) -> None:
    paths = spec["paths"]
    for path, verb in [
        ("/v1/models", "get"),
        ("/v1/models/{model}", "get"),
        ("/v1/methods", "get"),
        ("/v1/models/{model}/predict", "post"),
        ("/v1/models/{model}/explain", "post"),
        ("/v1/models/{model}/compare", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/v1/models/{model}:predict", "post"),
        ("/v1/models/{model}:explain", "post"),
        ("/predictions/{model}", "post"),
        ("/predictions/{model}", "put"),
        ("/explanations/{model}", "post"),
        ("/explanations/{model}", "put"),
    ]:
        assert verb in paths[path], (path, verb)


def test_every_json_example_validates_against_its_schema(spec: dict[str, Any]) -> None:
    """Request and response examples (what Swagger UI shows and pre-fills) match their schemas.
    The OpenAPI file drops null members of examples: a member that may be null must not be
    required (the Job example lost ``finished_at``, ``error`` and ``result_url``; the explain
    example ``completeness_delta``; the job submission's example lacked ``model``)."""
    checked = 0
    failures = []
    for path, operations in spec["paths"].items():
        for verb, operation in operations.items():
            bodies = [("request", operation.get("requestBody", {}))]
            bodies += [(status, r) for status, r in operation.get("responses", {}).items()]
            for where, body in bodies:
                for media, content in body.get("content", {}).items():
                    if "json" not in media or "example" not in content or "schema" not in content:
                        continue
                    validator = jsonschema.Draft202012Validator(
                        {**content["schema"], "components": spec["components"]}
                    )
                    errors = [e.message for e in validator.iter_errors(content["example"])]
                    if errors:
                        failures.append((verb, path, where, errors[:3]))
                    checked += 1
    assert checked >= 10
    assert failures == []


def body_schema(spec: dict[str, Any], route: str, media: str) -> dict[str, Any]:
    schema: dict[str, Any] = spec["paths"][f"/v1/models/{{model}}/{route}"]["post"]["requestBody"]["content"][
        media
    ]["schema"]
    return schema


@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_image_routes_take_a_file_or_base64(spec: dict[str, Any], route: str) -> None:
    form = body_schema(spec, route, "multipart/form-data")
    assert form["properties"]["image"]["format"] == "binary"  # Swagger UI's file picker
    assert "image" in form["required"]
    body = body_schema(spec, route, "application/json")
    assert body["properties"]["image"]["contentEncoding"] == "base64"
    assert set(form["properties"]) == set(body["properties"])  # the same parameters either way


def test_method_enum_is_the_registry(spec: dict[str, Any]) -> None:
    for media in ("multipart/form-data", "application/json"):
        props = body_schema(spec, "explain", media)["properties"]
        assert props["method"]["enum"] == method_names()
        assert props["method"]["default"] == "gradcam"
        assert props["colormap"]["enum"] == list(COLORMAPS)
        # the widest bound any method allows (kernel_shap, lime); the noise methods' own 256 is
        # in their GET /v1/methods schema and refused with a 422 (test_bad_inputs)
        assert props["steps"]["maximum"] == 512 and props["samples"]["maximum"] == 4096
    assert list(body_schema(spec, "explain", "multipart/form-data")["properties"])[:3] == [
        "image",
        "method",
        "target",
    ]


def test_explain_documents_png_json_and_npy_with_examples(spec: dict[str, Any]) -> None:
    ok = spec["paths"]["/v1/models/{model}/explain"]["post"]["responses"]["200"]
    content = ok["content"]
    assert content["image/png"]["schema"]["format"] == "binary"
    assert content["application/json"]["schema"]["$ref"].endswith("/ExplainResponse")
    example = content["application/json"]["example"]
    assert example["explanations"][0]["target"] == {"index": 285, "label": "Egyptian cat", "score": 0.79}
    assert "application/x-npy" in content
    assert set(ok["headers"]) == {"X-Target-Index", "X-Target-Label", "X-Target-Score", "X-Elapsed-Ms"}
    errors = spec["paths"]["/v1/models/{model}/explain"]["post"]["responses"]
    for status in ("404", "406", "413", "415", "422", "503", "504"):
        assert "application/problem+json" in errors[status]["content"], status
    compare = spec["paths"]["/v1/models/{model}/compare"]["post"]["responses"]["200"]["content"]
    assert {"image/png", "application/json"} <= set(compare)


def test_docs_are_served_offline() -> None:
    client = TestClient(create_app(Settings(models_config=None)))  # no lifespan: no model loads
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: ?'([^']+)'", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls  # nothing from a CDN
    assert "/docs/assets/swagger-ui-bundle.js" in urls and "/docs/assets/swagger-ui.css" in urls
    js = client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and len(js.content) > 100_000
    assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    served = client.get("/openapi.json")
    assert served.status_code == 200 and served.json()["openapi"].startswith("3.")


def test_cli_openapi_prints_the_spec(spec: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from service.__main__ import main

    assert main(["openapi"]) == 0
    assert json.loads(capsys.readouterr().out) == spec


def test_cli_serve_refuses_a_broken_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.__main__ import main
    from service.config import get_settings

    bad = tmp_path / "models.toml"
    bad.write_text("[[models]]\nname = 'x'\nsource = 'timm'\n")  # timm needs an architecture
    monkeypatch.setenv("SALIENCY_MODELS_CONFIG", str(bad))
    monkeypatch.setenv("SALIENCY_RETAIN_HEAP", "false")  # leave the test process's allocator alone
    get_settings.cache_clear()
    try:
        assert main(["serve", "--port", "0"]) == 2
    finally:
        get_settings.cache_clear()
    assert "architecture" in capsys.readouterr().err


@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_the_documented_json_example_works(spec: dict[str, Any], client: TestClient, route: str) -> None:
    media = spec["paths"][f"/v1/models/{{model}}/{route}"]["post"]["requestBody"]["content"][
        "application/json"
    ]
    r = client.post(f"/v1/models/tiny/{route}", json=media["example"])
    assert r.status_code == 200, r.text
