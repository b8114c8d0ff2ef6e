"""Contract tests: schemathesis generates requests from the committed ``openapi/openapi.json``
for every operation (jobs and the compatibility routes included) and sends them to the real app,
served by uvicorn on 127.0.0.1; every answer must be documented (status, content type, headers)
and match its schema, and none may be a 5xx.

``test_job_workflows_keep_their_contract`` follows the links of a submitted job (status, result,
cancel). Bounded: the coverage phase plus a few fuzzed examples per operation (``CONTRACT_EXAMPLES``), no
shrinking, the server's synchronous budget lowered so that no generated parameters make it
compute for long: about a minute on two cores. The only change to the schema as committed: the ``{model}`` path parameter is
narrowed to the test models and one unknown name, so requests reach the routes' own checks
instead of all stopping at 404.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from api_helpers import make_settings
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.openapi import TINY_PNG_BASE64
from service.app import create_app

OPENAPI = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CONTRACT_EXAMPLES = 5
MODELS = ["tiny", "tiny_crop", "nope"]


@pytest.fixture(scope="module")
def live(tiny_config: Path) -> Iterator[str]:
    """The app on 127.0.0.1 at a free port (uvicorn in a thread), ready."""
    app = create_app(
        make_settings(
            tiny_config,
            max_sync_passes=256,
            job_max_passes=256,
            request_timeout_s=20,
            torch_threads=1,
        )
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the contract server did not become ready")
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def narrowed(document: dict[str, Any]) -> dict[str, Any]:
    """The committed schema with the model a request names (the ``{model}`` path parameter, a
    job's ``model``) limited to ``MODELS``, and the job example's model one of them."""
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == "model":
                    parameter["schema"] = {**parameter["schema"], "enum": MODELS}
    for content in document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"].values():
        content["schema"]["properties"]["model"]["enum"] = MODELS
        if "example" in content:
            content["example"]["model"] = MODELS[0]
    return document


def contract_schema(examples: int) -> Any:
    """Examples, then the coverage phase (boundary and invalid values of every parameter), then
    ``examples`` fuzzed cases per operation. Compare and evaluate compute for a second or more on
    every valid request: their coverage phase sends invalid values only (their examples and
    fuzzed cases still reach the computation)."""
    config = SchemathesisConfig.from_dict(
        {
            "request-timeout": 30,
            # 503 (the job queue or a worker pool full) and 504 (the request's deadline) are the
            # documented answers of an overloaded server: a slow CI machine running the fuzzed
            # jobs meets them; a crash is still a 500
            "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]}},
            "generation": {"max-examples": examples, "no-shrink": True, "deterministic": True},
            "operations": [
                {
                    "include-path-regex": "/(compare|evaluate)$",
                    "phases": {"coverage": {"generation": {"mode": "negative"}}},
                }
            ],
        }
    )
    return schemathesis.openapi.from_dict(narrowed(json.loads(OPENAPI.read_text())), config=config)


# built at import (schemathesis' lazy ``from_fixture`` does not run under pytest 9); the server's
# address comes from the ``live`` fixture at call time
schema = contract_schema(CONTRACT_EXAMPLES)


@pytest.mark.slow  # about a minute on two cores, most of it the coverage phase
@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_every_operation_keeps_its_contract(case: schemathesis.Case, live: str) -> None:
    case.call_and_validate(base_url=live, checks=CHECKS)


@pytest.mark.slow
def test_job_workflows_keep_their_contract(live: str) -> None:
    """Stateful: sequences that follow the links of ``POST /v1/jobs`` (its 202 answer's id to
    ``GET /v1/jobs/{id}``, ``…/result``, ``DELETE``), every answer checked as above."""

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": live}

        def before_call(self, case: schemathesis.Case) -> None:
            # a job of a real image on a real model, so that its links are followed
            if case.method == "POST" and case.path == "/v1/jobs" and isinstance(case.body, dict):
                json_body = case.media_type == "application/json"
                case.body["images"] = [TINY_PNG_BASE64 if json_body else base64.b64decode(TINY_PNG_BASE64)]
                case.body["model"] = MODELS[0]

        def validate_response(
            self, response: Any, case: schemathesis.Case, *args: Any, **kwargs: Any
        ) -> None:
            case.validate_response(response, checks=CHECKS)

    Workflow.run(
        settings=settings(
            max_examples=12,
            stateful_step_count=5,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
    )
