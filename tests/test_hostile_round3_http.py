"""Hostile world, round three (#22), the HTTP edge: keys read only from plain bodies,
strict numbers, HEAD wherever GET works, and pages a browser can open safely (`/docs`
served offline, every page under a strict CSP).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from tests.http_fixtures import LoopbackServer
from tests.service_fixtures import MIX, RunningService
from tests.test_playground import chromium, wait

MB = 2**20

# -- 4. bodies whose key can only be read by parsing them ----------------------------------------

PLAIN = "the API key must be sent once, as a plain JSON string"


def post_raw(running: RunningService, body: bytes) -> tuple[int, dict[str, object]]:
    reply = running.http.post(
        running.base_url + MIX, content=body, headers={"Content-Type": "application/json"}
    )
    return reply.status_code, reply.json()


def sixteen_mib(head: str) -> bytes:
    """A body just under the 16 MiB limit: `head`, then a huge prompt."""
    start = ("{" + head + ', "image": "x", "prompt": "').encode()
    return start + b"x" * (16 * MB - len(start) - 2) + b'"}'


@pytest.mark.parametrize(
    "spelling",
    [r'"k\u0065y"', r'"\u006bey"', r'"\u006Bey"', r'"ke\u0079"', r'"\u006b\u0065\u0079"'],
)
def test_4_a_key_spelled_with_escapes_is_refused_unparsed(
    running: RunningService, parses: list[int], spelling: str
) -> None:
    status, reply = post_raw(running, sixteen_mib(f'{spelling}: "{running.key}"'))
    assert (status, parses) == (401, [])  # even the right key: it is not plain
    assert PLAIN in str(reply["message"])


@pytest.mark.parametrize(
    "member",
    [
        '"key": 12345',
        '"key": null',
        '"key": ["x"]',
        '"key": {"k": "x"}',
        r'"key": "mm_\u0041"',  # an escape in the value
        '"key": "' + "k" * 257 + '"',
        '"key": "bogus", "key": "KEY"',  # a parser takes the last one; we take none
        '"key": "KEY", "nested": {"key": "bogus"}',
    ],
)
def test_4_a_key_that_is_not_one_plain_string_is_refused_unparsed(
    running: RunningService, parses: list[int], member: str
) -> None:
    status, reply = post_raw(running, sixteen_mib(member.replace("KEY", running.key)))
    assert (status, parses) == (401, []) and PLAIN in str(reply["message"])


def test_4_a_body_without_a_key_is_refused_unparsed(
    running: RunningService, parses: list[int]
) -> None:
    status, reply = post_raw(running, sixteen_mib('"note": "\\"key\\": is inside a string"'))
    assert (status, parses) == (401, []) and "no API key" in str(reply["message"])


@pytest.mark.parametrize(
    "encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-8-sig"]
)
def test_4_a_body_not_in_plain_utf8_is_refused_unparsed(
    running: RunningService, parses: list[int], encoding: str
) -> None:
    body = f'{{"key": "{running.key}", "prompt": "x", "image": "y"}}'.encode(encoding)
    status, reply = post_raw(running, body)
    assert (status, parses) == (422, []) and "UTF-8" in str(reply["message"])


def test_4_invalid_utf8_is_refused_unparsed_with_where(
    running: RunningService, parses: list[int]
) -> None:
    body = b'{"key": "%s", "prompt": "caf\xe9", "image": "y"}' % running.key.encode()
    status, reply = post_raw(running, body)
    assert (status, parses) == (422, []) and "not valid UTF-8 (at byte" in str(reply["message"])


def test_4_a_plain_key_with_escapes_elsewhere_reaches_validation(
    running: RunningService, parses: list[int]
) -> None:
    """Only the key must be plain: escapes in other fields are JSON as usual."""
    body = b'{"key": "%s", "prompt": "\\"key\\": \\u00e9", "width": 1}' % running.key.encode()
    status, reply = post_raw(running, body)
    assert status == 422 and set(reply["errors"]) == {"image", "width"}  # type: ignore[arg-type]
    assert len(parses) == 1


# -- 5. loose numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("track_id", int("9" * 4000)),  # was accepted and echoed in the reply and webhook
        ("track_id", 2**63),
        ("track_id", True),
        ("track_id", 2.0),
        ("track_id", ["x"]),
        ("track_id", "x" * 257),
        ("steps", True),
        ("kmin", True),
        ("seed", False),
        ("samples", True),
        ("guidance_scale", True),
        ("width", True),
        ("steps", "1_0"),
        ("seed", "1_000"),
        ("width", "2_56"),
        ("steps", " 20"),
        ("steps", "20\n"),
        ("steps", "+20"),
        ("steps", "0020"),
        ("kmin", ".3"),
        ("kmin", " 0.3"),
        ("steps", "２０"),  # fullwidth digits
        ("prompt", 123),
        ("negative_prompt", 1.5),
        ("image", 7),
        ("webhook", 1),
    ],
)
def test_5_a_loose_spelling_is_422_naming_the_field(
    running: RunningService, field: str, value: object
) -> None:
    reply = running.mix(**{field: value})
    assert reply.status_code == 422, reply.text[:200]
    assert field in reply.json()["errors"], reply.json()


@pytest.mark.parametrize(
    ("field", "value", "meant"),
    [
        ("steps", "2", 2),
        ("seed", "7", 7),
        ("kmin", "0.25", 0.25),
        ("kmax", "5e-1", 0.5),
        ("track_id", 2**63 - 1, 2**63 - 1),
        ("track_id", -(2**63), -(2**63)),
        ("track_id", "x" * 256, "x" * 256),
    ],
)
def test_5_numbers_written_as_json_writes_them_are_still_accepted(
    running: RunningService, image_host: LoopbackServer, field: str, value: object, meant: object
) -> None:
    fields = {"image": image_host.url("/layout.png"), "steps": 2, "seed": 1, field: value}
    reply = running.mix(**fields)
    assert reply.status_code == 200, reply.text[:300]
    job = running.wait_success(reply.json()["id"])
    echoed = job.get("track_id") if field == "track_id" else job["meta"][field]
    assert echoed == meant


def test_5_a_job_id_in_the_path_is_spelled_plainly(running: RunningService) -> None:
    for loose in ("1_0", "+1", "%201"):
        assert running.fetch(loose).status_code == 422  # type: ignore[arg-type]


# -- 6. HEAD wherever GET works ------------------------------------------------------------------


def get_paths(running: RunningService, image_host: LoopbackServer) -> list[str]:
    """One path of every kind that answers GET: an output, pages, static and vendor files."""
    reply = running.mix(image=image_host.url("/layout.png"), steps=2, seed=1)
    output = running.wait_success(reply.json()["id"])["output"][0]
    return [
        output.removeprefix(running.base_url),
        "/",
        "/healthz",
        "/static/app.js",
        "/static/sample-layout.png",
        "/docs",
        "/docs/vendor/swagger-ui-bundle.js",
        "/openapi.json",
    ]


def test_6_head_answers_wherever_get_does_with_the_same_headers_and_no_body(
    running: RunningService, image_host: LoopbackServer
) -> None:
    for path in get_paths(running, image_host):
        got = running.http.get(running.base_url + path)
        head = running.http.head(running.base_url + path)
        assert (got.status_code, head.status_code) == (200, 200), path
        assert head.content == b"", path
        for name in ("content-type", "content-length", "content-security-policy"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)


def test_6_head_on_a_missing_output_or_a_post_route_answers_as_get_would(
    running: RunningService,
) -> None:
    for path in ("/outputs/no-such-file.png", "/api/v1/enterprise/image_editing/magic_mix"):
        got = running.http.get(running.base_url + path)
        head = running.http.head(running.base_url + path)
        assert head.status_code == got.status_code != 200 and head.content == b""


# -- 7. pages a browser can open safely -------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/docs", "/static/app.js", "/healthz", "/openapi.json"])
def test_7_every_answer_carries_the_browser_hardening_headers(
    running: RunningService, path: str
) -> None:
    headers = running.http.get(running.base_url + path).headers
    policy = headers["content-security-policy"]
    assert "script-src 'self';" in policy and "'unsafe-inline'" not in policy
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"


def test_7_the_docs_page_has_no_inline_script_and_nothing_from_other_hosts(
    running: RunningService,
) -> None:
    page = running.http.get(running.base_url + "/docs").text
    assert "<script>" not in page and "cdn." not in page and "//" not in page.replace("://", "")
    assert running.http.get(running.base_url + "/redoc").status_code == 404  # FastAPI's CDN page


@pytest.fixture(scope="module")
def offline_browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Chromium that can reach 127.0.0.1 only: every other name fails to resolve and any
    proxied fetch goes to a closed port."""
    driver = chromium(
        tmp_path_factory.mktemp("offline-profile"),
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
    )
    try:
        yield driver
    finally:
        driver.quit()


def test_7_docs_render_in_a_browser_with_the_network_off(
    running: RunningService, offline_browser: WebDriver
) -> None:
    offline_browser.get(running.base_url + "/docs")
    wait(
        offline_browser,
        "Swagger UI rendering the operations",
        "document.querySelectorAll('.opblock').length >= 9"
        " && document.querySelector('.info .title')?.textContent.includes('magicmix')",
    )
    loaded = offline_browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert loaded and all(url.startswith(running.base_url) for url in loaded), loaded
    problems = [e for e in offline_browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, problems  # a CSP refusal or a failed load is logged as SEVERE
