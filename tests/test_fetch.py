"""Fetching layout images: redirects re-checked, sizes and time bounded, errors client-safe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from http_fixtures import Handler, LoopbackServer, free_port, redirect, respond

from magicmix.config import Settings
from magicmix.errors import InvalidInput, PayloadTooLarge
from magicmix.inputs.fetch import MAX_REDIRECTS, fetch_image_bytes

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # content is not inspected here
LIMIT = 4096


def slow_body(declared: int, pause_s: float) -> Handler:
    """A handler that announces `declared` bytes, then sends one every `pause_s` seconds."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "image/png")
        request.send_header("Content-Length", str(declared))
        request.end_headers()
        for _ in range(declared):
            request.wfile.write(b"x")
            request.wfile.flush()
            time.sleep(pause_s)

    return handle


def endless_body(request: BaseHTTPRequestHandler) -> None:
    """No Content-Length (HTTP/1.0, body ends at close) and more bytes than the limit."""
    request.send_response(200)
    request.send_header("Content-Type", "image/png")
    request.end_headers()
    for _ in range(64):
        request.wfile.write(b"x" * 1024)


def huge_announced(request: BaseHTTPRequestHandler) -> None:
    """Announces 100 MB, then sends nothing for a minute: refusing must not wait for the body."""
    request.send_response(200)
    request.send_header("Content-Length", str(100 * 1024 * 1024))
    request.end_headers()
    request.wfile.flush()
    time.sleep(60)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as running:
        running.route("/a.png", respond(200, IMAGE, {"Content-Type": "image/png"}))
        running.route("/hop1", redirect("/hop2", 301))
        running.route("/hop2", redirect("a.png", 307))
        running.route("/to-metadata", redirect("http://169.254.169.254/latest/meta-data/"))
        running.route("/to-file", redirect("file:///etc/passwd"))
        running.route("/loop", redirect("/loop"))
        running.route("/page", respond(200, b"<html></html>", {"Content-Type": "text/html"}))
        running.route("/endless", endless_body)
        running.route("/huge", huge_announced)
        running.route("/drip", slow_body(declared=1000, pause_s=0.05))
        yield running


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path, allow_private_urls=True, fetch_timeout_s=2.0, max_image_bytes=LIMIT
    )


def fetch(url: str, settings: Settings, field: str = "image") -> bytes:
    return asyncio.run(fetch_image_bytes(url, settings, field=field))


def test_fetches_the_bytes(server: LoopbackServer, settings: Settings) -> None:
    assert fetch(server.url("/a.png"), settings) == IMAGE


def test_follows_relative_redirects(server: LoopbackServer, settings: Settings) -> None:
    assert fetch(server.url("/hop1"), settings) == IMAGE
    assert [r.path for r in server.requests] == ["/hop1", "/hop2", "/a.png"]


def test_redirect_to_metadata_address_is_refused_before_connecting(
    server: LoopbackServer, settings: Settings
) -> None:
    with pytest.raises(InvalidInput, match=r"link-local .*169\.254\.169\.254.*refused"):
        fetch(server.url("/to-metadata"), settings)


def test_redirect_to_another_scheme_is_refused(server: LoopbackServer, settings: Settings) -> None:
    with pytest.raises(InvalidInput, match="http or https"):
        fetch(server.url("/to-file"), settings)


def test_redirect_loop_stops(server: LoopbackServer, settings: Settings) -> None:
    with pytest.raises(InvalidInput, match=f"more than {MAX_REDIRECTS} times"):
        fetch(server.url("/loop"), settings)
    assert len(server.requests) == MAX_REDIRECTS + 1


def test_loopback_refused_without_allow_private(server: LoopbackServer, settings: Settings) -> None:
    strict = settings.model_copy(update={"allow_private_urls": False})
    with pytest.raises(InvalidInput, match="private or loopback") as caught:
        fetch(server.url("/a.png", host="localhost"), strict, field="init_image")
    assert caught.value.field == "init_image"
    assert server.requests == []


def test_body_over_the_limit(server: LoopbackServer, settings: Settings) -> None:
    with pytest.raises(PayloadTooLarge, match=f"larger than {LIMIT} bytes"):
        fetch(server.url("/endless"), settings)


def test_announced_size_over_the_limit_is_refused_before_reading(
    server: LoopbackServer, settings: Settings
) -> None:
    huge = server.watch("/huge")
    with pytest.raises(PayloadTooLarge, match="104857600 bytes"):
        fetch(server.url("/huge"), settings)
    assert huge.entered.is_set() and not huge.completed.is_set()  # refused while the server held it


def test_dripping_server_is_cut_off_by_the_deadline(
    server: LoopbackServer, settings: Settings
) -> None:
    """Each byte comes well within any per-read timeout; only the total deadline stops it."""
    quick = settings.model_copy(update={"fetch_timeout_s": 0.5})
    drip = server.watch("/drip")
    with pytest.raises(InvalidInput, match=r"longer than 0\.5 s"):
        fetch(server.url("/drip"), quick)
    assert drip.entered.is_set() and not drip.completed.is_set()  # cut before the 50 s body ended


def test_error_status(server: LoopbackServer, settings: Settings) -> None:
    with pytest.raises(InvalidInput, match="answered HTTP 404 Not Found"):
        fetch(server.url("/missing.png"), settings)


def test_web_page_is_refused(server: LoopbackServer, settings: Settings) -> None:
    with pytest.raises(InvalidInput, match=r"web page \(text/html\)"):
        fetch(server.url("/page"), settings)


def test_connection_refused_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(InvalidInput, match="could not fetch the image URL: could not connect"):
        fetch(f"http://127.0.0.1:{free_port()}/a.png", settings)
