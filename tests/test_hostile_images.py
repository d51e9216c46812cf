"""Hostile layout images through the API: each gets a clear 4xx or a correct image.

A generated corpus, sent inline (data: URIs) and from loopback URLs: empty files,
truncated PNG/JPEG, decompression bombs (tiny files claiming huge dimensions, PNG and
JPEG), animated GIF/PNG/WebP, SVG (with an external entity), other formats, a stream cut
at the byte limit, a server that drips bytes, a server that never answers, wrong content
types, and every pixel mode we can write (CMYK, 16-bit, alpha, grey, 1-bit, palette with
transparency, EXIF-rotated, 1x1, extreme aspect). No reply may be a 5xx; every error is
the contract's error body naming `image`; every accepted image yields a 256x256 PNG. After
the corpus the service still serves: health answers during a drip, the queue is empty and
a plain job succeeds (no hung worker).
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_layout_image
from tests.http_fixtures import LoopbackServer, respond
from tests.service_fixtures import RunningService, png, serve, service_settings

MAX_BYTES = 256 * 1024
MAX_PIXELS = 4_000_000
FETCH_TIMEOUT_S = 3.0  # the window in which /healthz must answer during a slow fetch
FAST = {"steps": 2, "width": 256, "height": 256, "seed": 7}  # one UNet step per job


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height 8-bit grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096, 9))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16x16 JPEG with its frame header rewritten to claim width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), "red"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    return encode(make_layout_image(), "JPEG", exif=exif)


def palette_with_transparency() -> bytes:
    image = make_layout_image().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    return encode(image, "PNG", transparency=0)


def sixteen_bit_grey() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 320, dtype=np.uint16), (240, 1))
    return encode(Image.fromarray(ramp))


SVG = (
    b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<text>&x;</text><image href="http://169.254.169.254/"/></svg>'
)
LAYOUT_PNG = png(make_layout_image())
LAYOUT_JPEG = png(make_layout_image(), "JPEG")
RGBA = make_layout_image().convert("RGBA")
RGBA.putalpha(128)

# name -> (bytes, expected status); the 4xx ones must name the image field
REFUSED: dict[str, tuple[bytes, int]] = {
    "empty": (b"", 422),
    "png signature only": (b"\x89PNG\r\n\x1a\n", 422),
    "truncated png": (LAYOUT_PNG[: len(LAYOUT_PNG) // 2], 422),
    "truncated jpeg": (LAYOUT_JPEG[: len(LAYOUT_JPEG) // 2], 422),
    "png header claiming 30000x30000": (png_claiming(30_000, 30_000), 413),
    "png header claiming 2^31x1": (png_claiming(2**31 - 1, 1), 413),
    "jpeg header claiming 65000x65000": (jpeg_claiming(65_000, 65_000), 413),
    "real png just over the pixel limit": (encode(Image.new("L", (2001, 2000))), 413),
    "animated gif": (animated("GIF"), 422),
    "animated png": (animated("PNG"), 422),
    "animated webp": (animated("WEBP"), 422),
    "still gif": (encode(Image.new("RGB", (32, 32)), "GIF"), 422),
    "svg with an external entity": (SVG, 422),
    "tiff": (encode(make_layout_image(), "TIFF"), 422),
    "bmp": (encode(make_layout_image(), "BMP"), 422),
    "ico": (encode(make_layout_image(64, 64), "ICO"), 422),
    "html": (b"<!doctype html><html><body>not an image</body></html>", 422),
    "random bytes": (np.random.default_rng(0).bytes(4096), 422),
    "zeros": (b"\x00" * 4096, 422),
}
ACCEPTED: dict[str, bytes] = {
    "cmyk jpeg": encode(make_layout_image().convert("CMYK"), "JPEG"),
    "16-bit grey png": sixteen_bit_grey(),
    "rgba png, half transparent": encode(RGBA),
    "grey + alpha png": encode(make_layout_image().convert("LA")),
    "grey png": encode(make_layout_image().convert("L")),
    "1-bit png": encode(make_layout_image().convert("1")),
    "palette png with transparency": palette_with_transparency(),
    "progressive jpeg": encode(make_layout_image(), "JPEG", progressive=True),
    "exif-rotated jpeg": exif_rotated_jpeg(),
    "rgba webp": encode(RGBA, "WEBP"),
    "1x1 png": encode(Image.new("RGB", (1, 1), "white")),
    "2000x2 png": encode(Image.new("RGB", (2000, 2), "white")),
    "png with trailing garbage": LAYOUT_PNG + b"PK\x03\x04" + b"\x00" * 64,
}


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def drip(request: Any) -> None:
    """Headers, then one byte every 0.1 s for 30 s, far longer than the fetch deadline."""
    request.send_response(200)
    request.send_header("Content-Type", "image/png")
    request.send_header("Content-Length", "100000")
    request.end_headers()
    for byte in LAYOUT_PNG[:300]:
        request.wfile.write(bytes([byte]))
        request.wfile.flush()
        time.sleep(0.1)


def endless(request: Any) -> None:
    """A PNG-looking body with no Content-Length that goes on to 8x the byte limit."""
    request.send_response(200)
    request.send_header("Content-Type", "image/png")
    request.end_headers()
    request.wfile.write(LAYOUT_PNG[:64])
    chunk = b"\x00" * 65536
    for _ in range(8 * MAX_BYTES // len(chunk)):
        request.wfile.write(chunk)


def silent(request: Any) -> None:
    """Accepts the connection and says nothing for a minute."""
    time.sleep(60)


@pytest.fixture(scope="module")
def hostile_host() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        server.route("/drip.png", drip)
        server.route("/endless.png", endless)
        server.route("/silent.png", silent)
        server.route("/empty.png", respond(200, b"", {"Content-Type": "image/png"}))
        server.route("/page.png", respond(200, LAYOUT_PNG, {"Content-Type": "text/html"}))
        server.route("/svg.png", respond(200, SVG, {"Content-Type": "image/png"}))
        server.route("/bomb.jpg", respond(200, jpeg_claiming(65_000, 65_000)))
        server.route("/octet.png", respond(200, LAYOUT_PNG, {"Content-Type": "application/x"}))
        server.route("/mislabelled.jpg", respond(200, LAYOUT_PNG, {"Content-Type": "image/jpeg"}))
        server.route("/gone.png", respond(404, b"no"))
        yield server


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[RunningService]:
    settings = service_settings(
        tmp_path_factory.mktemp("hostile"),
        tiny_model_dir,
        max_image_bytes=MAX_BYTES,
        max_image_pixels=MAX_PIXELS,
        fetch_timeout_s=FETCH_TIMEOUT_S,
        batch_size=8,
        sync_wait_s=60,
    )
    with serve(settings) as running:
        yield running


def assert_clear_error(reply: Any, status: int, what: str) -> None:
    assert reply.status_code == status, (what, reply.status_code, reply.text)
    body = reply.json()
    assert body["status"] == "error" and "image" in body["errors"], (what, body)
    assert "Traceback" not in reply.text and len(body["message"]) < 500, what


def test_refused_inline_images_get_a_clear_4xx(app: RunningService) -> None:
    for what, (data, status) in REFUSED.items():
        assert_clear_error(app.mix(image=data_uri(data), **FAST), status, what)
        assert_clear_error(
            app.mix(image=base64.b64encode(data).decode() or "=", **FAST), status, what
        )


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/empty.png", 422, "empty"),
        ("/endless.png", 413, "larger than"),
        ("/page.png", 422, "web page"),
        ("/svg.png", 422, "not a readable"),
        ("/bomb.jpg", 413, "pixels"),
        ("/gone.png", 422, "404"),
    ],
)
def test_refused_urls_get_a_clear_4xx(
    app: RunningService, hostile_host: LoopbackServer, path: str, status: int, says: str
) -> None:
    reply = app.mix(image=hostile_host.url(path), **FAST)
    assert_clear_error(reply, status, path)
    assert says in reply.json()["errors"]["image"]


@pytest.mark.parametrize("path", ["/drip.png", "/silent.png"])
def test_slow_servers_are_cut_off_by_the_deadline_while_the_api_keeps_answering(
    app: RunningService, hostile_host: LoopbackServer, path: str
) -> None:
    result: dict[str, Any] = {}
    slow = hostile_host.watch(path)
    caller = threading.Thread(
        target=lambda: result.update(reply=app.mix(image=hostile_host.url(path), **FAST))
    )
    caller.start()
    assert slow.entered.wait(30)
    assert app.http.get(app.base_url + "/healthz").status_code == 200
    assert "reply" not in result  # health answered while the fetch was still held up
    caller.join(FETCH_TIMEOUT_S + 30)
    assert_clear_error(result["reply"], 422, path)
    assert "longer than" in result["reply"].json()["errors"]["image"]
    assert not slow.completed.is_set()  # the deadline cut it, the server did not finish


def test_accepted_images_all_become_256_pngs(
    app: RunningService, hostile_host: LoopbackServer
) -> None:
    sources = {what: data_uri(data) for what, data in ACCEPTED.items()}
    sources["served as application/x"] = hostile_host.url("/octet.png")
    sources["png served as image/jpeg"] = hostile_host.url("/mislabelled.jpg")
    with ThreadPoolExecutor(len(sources)) as pool:  # sent together: they share UNet batches
        replies = dict(
            zip(
                sources, pool.map(lambda s: app.mix(image=s, **FAST), sources.values()), strict=True
            )
        )
    for what, reply in replies.items():
        assert reply.status_code == 200, (what, reply.text)
        body = reply.json()
        assert body["status"] == "success", (what, body)
        image = Image.open(io.BytesIO(app.download(body["output"][0])))
        assert (image.format, image.size, image.mode) == ("PNG", (256, 256), "RGB"), what


def test_service_is_intact_after_the_corpus(app: RunningService) -> None:
    """Runs last in this module: nothing stuck in the queue, and a plain job still succeeds."""
    assert app.service.jobs.queue_length() == 0
    worker = app.service.dispatcher
    assert worker._thread is not None and worker._thread.is_alive()  # type: ignore[attr-defined]
    reply = app.mix(image=data_uri(LAYOUT_PNG), **FAST)
    assert reply.status_code == 200 and reply.json()["status"] == "success", reply.text
