"""Contract fuzzing: schemathesis drives the running server from its own OpenAPI document.

For every operation in `/openapi.json`, Hypothesis generates bodies and path parameters
that fit the schema (positive) and that do not (negative). Each case is sent to the real
server (uvicorn on loopback, the tiny model) and its reply must:

- never be a 5xx;
- use a status code the document declares for that operation, with the declared content
  type, and a body that validates against the declared schema (schemathesis checks);
- carry no traceback, and, when it is an error, the contract's `{"status": "error", ...}`.

Random keys stop at 401, so a share of cases get the test key put in their body, and a
share of `magic_mix` cases get a real loopback image (with a 256x256, <= 4-step size so a
job costs about a second), to reach past authentication and image checks into validation,
the queue (`max_queue` is small: 429 is part of the contract) and the worker.

Everything runs under `tests.test_ssrf_api.loopback_only`: generated URLs (image, webhook,
endpoint_url) cannot resolve or reach anything outside loopback.

Budget: `FUZZ_EXAMPLES` cases per operation and mode in the default suite, a larger
`slow` run. Bugs it found are fixed; each has a regression test below.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import make_layout_image
from tests.http_fixtures import LoopbackServer
from tests.service_fixtures import API, RunningService, png, serve, service_settings
from tests.test_ssrf_api import loopback_only

FUZZ_EXAMPLES = 15
SLOW_FUZZ_EXAMPLES = 150
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SQLITE_MAX_INT = 2**63 - 1
SMALL_JOB = {"width": 256, "height": 256, "steps": 4, "kmin": 0.25, "kmax": 0.5}


@pytest.fixture(scope="module")
def fuzz_app(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningService]:
    settings_ = service_settings(
        tmp_path_factory.mktemp("fuzz"),
        tiny_model_dir,
        sync_wait_s=0,  # answer `processing` at once: the fuzzer measures the API
        max_queue=4,
        max_queued_per_key=3,
        fetch_timeout_s=2,
        webhook_max_attempts=1,
    )
    with serve(settings_) as running:
        yield running
        running.post(f"{API}/image_editing/clear_queue", {"key": running.admin_key})


@pytest.fixture(scope="module")
def schema(fuzz_app: RunningService) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_app.base_url}/openapi.json")


def operations(schema: schemathesis.BaseSchema) -> list[Any]:
    found = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the OpenAPI document has an invalid operation: {result}"
        found.append(result.ok())
    return found


def steer(
    case: Any, app: RunningService, image_host: LoopbackServer, choice: dict[str, Any]
) -> None:
    """Give some cases a valid key (and a real image) so they reach past the first checks."""
    if not isinstance(case.body, dict):
        return
    if choice["key"]:
        case.body["key"] = app.key
    path = case.operation.path
    if path.endswith("/magic_mix") and choice["image"] is not None:
        case.body["image"] = choice["image"]
        case.body.update(SMALL_JOB)
        case.body["webhook"] = None


def check_reply(case: Any, response: Any) -> None:
    case.validate_response(response, checks=CHECKS)
    assert "Traceback" not in response.text
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 400 and content_type.startswith("application/json"):
        body = response.json()
        assert body["status"] == "error" and isinstance(body["message"], str), body


def fuzz(
    app: RunningService, image_host: LoopbackServer, schema: schemathesis.BaseSchema, n: int
) -> dict[str, dict[int, int]]:
    """Run `n` examples per operation and mode; returns status-code counts per operation."""
    inline = "data:image/png;base64," + base64.b64encode(png(make_layout_image(64, 64))).decode()
    images = [None, None, image_host.url("/layout.png"), inline]
    seen: dict[str, dict[int, int]] = {}
    with loopback_only():
        for operation in operations(schema):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                counts = seen.setdefault(operation.label, {})

                @given(
                    case=operation.as_strategy(generation_mode=mode),
                    choice=st.fixed_dictionaries(
                        {"key": st.booleans(), "image": st.sampled_from(images)}
                    ),
                )
                @settings(
                    max_examples=n,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    phases=[Phase.generate, Phase.shrink],
                    suppress_health_check=list(HealthCheck),
                )
                def run(case: Any, choice: dict[str, Any]) -> None:
                    steer(case, app, image_host, choice)
                    response = case.call(base_url=app.base_url, timeout=30)
                    counts[response.status_code] = counts.get(response.status_code, 0) + 1  # noqa: B023
                    check_reply(case, response)

                try:
                    run()
                except Unsatisfiable:  # nothing invalid to send (e.g. GET /healthz)
                    assert mode is GenerationMode.NEGATIVE, operation.label
    return seen


def test_fuzz_the_api_contract(
    fuzz_app: RunningService, image_host: LoopbackServer, schema: schemathesis.BaseSchema
) -> None:
    seen = fuzz(fuzz_app, image_host, schema, FUZZ_EXAMPLES)
    print("\nfuzzed replies by operation:", json.dumps(seen, indent=1, sort_keys=True))
    statuses = {code for counts in seen.values() for code in counts}
    assert not {code for code in statuses if code >= 500}
    assert {200, 401, 422} <= statuses  # got past auth and validation, not only refused
    assert fuzz_app.http.get(fuzz_app.base_url + "/healthz").status_code == 200


@pytest.mark.slow
def test_fuzz_the_api_contract_long(
    fuzz_app: RunningService, image_host: LoopbackServer, schema: schemathesis.BaseSchema
) -> None:
    seen = fuzz(fuzz_app, image_host, schema, SLOW_FUZZ_EXAMPLES)
    print("\nfuzzed replies by operation:", json.dumps(seen, indent=1, sort_keys=True))
    assert fuzz_app.http.get(fuzz_app.base_url + "/healthz").status_code == 200


@pytest.mark.parametrize(
    "change",
    [{"deploy_type": "omitted"}, {"deploy_type": None}, {"image_directory": None}],
    ids=["deploy_type omitted", "deploy_type null", "image_directory null"],
)
def test_update_s3_without_deploy_type_is_not_a_500(
    fuzz_app: RunningService, change: dict[str, Any]
) -> None:
    body: dict[str, Any] = {
        "key": fuzz_app.key,
        "deploy_type": "image_editing",
        "endpoint_url": "http://127.0.0.1:9/bucket",
        "aws_access_key_id": "AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key": "not-a-real-secret-0123456789",
        **change,
    }
    body = {name: value for name, value in body.items() if value != "omitted"}
    with loopback_only():
        reply = fuzz_app.post(f"{API}/update_s3", body)
    assert reply.status_code < 500, reply.text


def test_body_that_is_not_utf8_is_422_not_400(fuzz_app: RunningService) -> None:
    reply = fuzz_app.http.post(
        f"{fuzz_app.base_url}{API}/image_editing/magic_mix",
        content=b'{"key": "\xc3\x28"}',  # invalid UTF-8
        headers={"Content-Type": "application/json"},
    )
    assert reply.status_code == 422, reply.text
    assert reply.json()["status"] == "error" and "body" in reply.json()["errors"]


def test_fetch_with_an_id_beyond_sqlite_integers_is_not_a_500(fuzz_app: RunningService) -> None:
    reply = fuzz_app.fetch(SQLITE_MAX_INT + 1)
    assert reply.status_code in (404, 422), reply.text
