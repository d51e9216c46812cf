"""Hostile world, round three (#22), the HTTP edge: HEAD wherever GET works, and pages a
browser can open safely: `/docs` served offline, and every page under a strict CSP.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from tests.http_fixtures import LoopbackServer
from tests.service_fixtures import RunningService
from tests.test_playground import chromium, wait

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
