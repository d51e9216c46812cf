"""Hostile world, round three: each attack that worked before, as a regression test.

Numbered as in the issue (#22). Loopback only; waits are on events, not on the clock.
"""

from __future__ import annotations

import base64
import functools
import gzip
import io
import random
import tracemalloc
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from PIL import Image, ImageCms, PngImagePlugin

from magicmix.config import Settings
from magicmix.errors import InvalidInput, PayloadTooLarge
from magicmix.inputs.images import decode_image, png_bytes
from magicmix.webhooks import MAX_RETRY_AFTER_S, _retry_after_s
from tests.http_fixtures import Handler, LoopbackServer, respond
from tests.service_fixtures import RunningService
from tests.test_fetch import fetch
from tests.test_jobs import Clock
from tests.test_webhooks import World

# -- 1. a receiver's Retry-After that made the whole sending pass fail ----------------------


def raw_answer(status_line: bytes, *headers: bytes) -> Handler:
    """A handler writing its status line and header bytes as given (UTF-8 included)."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        head = b"HTTP/1.1 " + status_line + b"\r\n" + b"".join(h + b"\r\n" for h in headers)
        request.wfile.write(head + b"Content-Length: 0\r\nConnection: close\r\n\r\n")

    return handle


@pytest.fixture
def hook_world(tmp_path: Path) -> Iterator[tuple[World, LoopbackServer, Clock]]:
    settings = Settings(data_dir=tmp_path, allow_private_urls=True, webhook_timeout_s=5)
    clock = Clock(1_000_000.0)
    with LoopbackServer() as receiver:
        yield World(tmp_path / "db.sqlite3", settings, clock), receiver, clock


NOT_DIGITS = ["²", "①", "٣", "５", "1e3", "-5", "5.5", "0x10", "+5", "5 s", "", " "]


@pytest.mark.parametrize("value", [*NOT_DIGITS, "Wed, ١٢ Oct 2030 07:28:00 GMT"])
def test_1_retry_after_that_is_not_ascii_digits_or_a_date_is_ignored(value: str) -> None:
    assert _retry_after_s(value) is None


def test_1_retry_after_takes_ascii_digits_with_optional_whitespace_and_caps_huge_ones() -> None:
    assert _retry_after_s("120") == 120.0 and _retry_after_s(" \t5 ") == 5.0
    assert _retry_after_s("9" * 5000) == MAX_RETRY_AFTER_S  # int() refuses 4,300+ digits
    assert _retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


@pytest.mark.parametrize(
    "header",
    [
        b"Retry-After: \xc2\xb2",  # '²' in UTF-8: str.isdigit() is true, float() raised
        b"Retry-After: \xe2\x91\xa0",  # '①'
        b"Retry-After: \xd9\xa3",  # Arabic-Indic three
        b"Retry-After: \xb2",  # Latin-1 '²'
        b"Retry-After: 1e3",
    ],
)
@pytest.mark.parametrize("status", [b"503 Service Unavailable", b"429 Too Many Requests"])
def test_1_a_strange_retry_after_is_recorded_as_one_failed_attempt(
    hook_world: tuple[World, LoopbackServer, Clock], header: bytes, status: bytes
) -> None:
    world, receiver, clock = hook_world
    receiver.route("/strange", raw_answer(status, header))
    job = world.ended_job(receiver.url("/strange"))
    [state] = world.send_due()
    assert state.phase == "pending" and state.attempts == 1
    assert state.last_status == int(status[:3])
    assert world.webhook(job.id) == state  # recorded on the job
    assert state.next_at == clock.now + 5  # the schedule's, as if no Retry-After was sent
    assert world.send_due() == [] and len(receiver.requests) == 1  # not sent again at once


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 400, 401, 404, 405, 418, 451])
def test_1_every_non_2xx_but_410_is_retried_on_the_schedule(
    hook_world: tuple[World, LoopbackServer, Clock], status: int
) -> None:
    world, receiver, clock = hook_world
    receiver.route("/elsewhere", respond(status, headers={"Location": receiver.url("/ok")}))
    receiver.route("/ok", respond(204))
    job = world.ended_job(receiver.url("/elsewhere"))
    schedule = world.sender._settings.webhook_schedule
    for offset in schedule:
        clock.now = (job.finished_at or 0) + offset
        [state] = world.send_due()
    assert state.phase == "failed" and state.attempts == len(schedule)
    assert state.last_error == f"the receiver answered HTTP {status}"
    assert {r.path for r in receiver.requests} == {"/elsewhere"}  # a redirect is not followed


def test_1_a_redirect_honours_its_retry_after(
    hook_world: tuple[World, LoopbackServer, Clock],
) -> None:
    world, receiver, clock = hook_world
    receiver.route("/moved", respond(307, headers={"Retry-After": "900", "Location": "/x"}))
    job = world.ended_job(receiver.url("/moved"))
    [state] = world.send_due()
    assert state.phase == "pending" and state.next_at == clock.now + 900
    assert world.webhook(job.id).last_status == 307


def test_1_an_unforeseen_error_in_an_attempt_is_recorded_not_raised(
    hook_world: tuple[World, LoopbackServer, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever raises inside one attempt (here the signer) fails that attempt only."""
    world, receiver, _ = hook_world
    receiver.route("/ok", respond(204))
    job = world.ended_job(receiver.url("/ok"))

    def broken(*args: object, **kwargs: object) -> dict[str, str]:
        raise LookupError("a corner nobody foresaw")

    monkeypatch.setattr("magicmix.webhooks.sign_headers", broken)
    [state] = world.send_due()
    assert state.phase == "pending" and state.attempts == 1
    assert state.last_error == "the attempt failed unexpectedly (LookupError)"
    assert world.webhook(job.id) == state


# -- 2. compressed image URLs that multiplied memory ------------------------------------------

BOMB_LIMIT = 64 * 1024  # MAGICMIX_MAX_IMAGE_BYTES in these tests
IMAGE = bytes(range(256)) * 200  # 51 KB, under the limit: content is not inspected here


def zeros_gzip(megabytes: int) -> bytes:
    """gzip of `megabytes` MB of zeros (~1000:1), built a megabyte at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(2**20)
    return b"".join(packer.compress(block) for _ in range(megabytes)) + packer.flush()


def deflate(data: bytes) -> bytes:
    return zlib.compress(data)


def encoded(body: bytes, coding: str) -> Handler:
    return respond(200, body, {"Content-Type": "image/png", "Content-Encoding": coding})


@pytest.fixture(scope="module")
def bombs() -> Iterator[LoopbackServer]:
    bomb = zeros_gzip(64)  # 64 KB -> 64 MB
    with LoopbackServer() as server:
        server.route("/bomb.gz", encoded(bomb, "gzip"))
        server.route("/nested.gz", encoded(gzip.compress(bomb), "gzip, gzip"))
        server.route("/plain", respond(200, IMAGE, {"Content-Type": "image/png"}))
        server.route("/image.gz", encoded(gzip.compress(IMAGE), "gzip"))
        server.route("/image.xgz", encoded(gzip.compress(IMAGE), "x-gzip"))
        server.route("/image.deflate", encoded(deflate(IMAGE), "deflate"))
        server.route("/image.gz.gz", encoded(gzip.compress(gzip.compress(IMAGE)), "gzip, gzip"))
        server.route("/image.id.gz", encoded(gzip.compress(IMAGE), "identity, GZIP"))
        server.route("/too-big.gz", encoded(gzip.compress(IMAGE * 2), "gzip"))
        server.route("/three.gz", encoded(IMAGE, "gzip, gzip, gzip"))
        server.route("/br", encoded(IMAGE, "br"))
        server.route("/zstd", encoded(IMAGE, "zstd"))
        server.route("/unknown", encoded(IMAGE, "x-mystery"))
        server.route("/corrupt.gz", encoded(b"\x1f\x8b" + IMAGE, "gzip"))
        server.route("/truncated.gz", encoded(gzip.compress(IMAGE)[:-40], "gzip"))
        yield server


@pytest.fixture
def bomb_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, allow_private_urls=True, max_image_bytes=BOMB_LIMIT)


def peak_bytes_of(url: str, settings: Settings) -> tuple[int, Exception | None]:
    """The most memory Python held at once while fetching `url`, and what it raised."""
    tracemalloc.start()
    try:
        fetch(url, settings)
        raised = None
    except InvalidInput as err:
        raised = err
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, raised


@pytest.mark.parametrize("path", ["/bomb.gz", "/nested.gz"])
def test_2_a_compressed_bomb_never_holds_more_than_the_image_limit(
    bombs: LoopbackServer, bomb_settings: Settings, path: str
) -> None:
    """httpx inflated each 64 KB network read whole (64 MB); decoding is ours, bounded."""
    baseline, _ = peak_bytes_of(bombs.url("/plain"), bomb_settings)
    peak, raised = peak_bytes_of(bombs.url(path), bomb_settings)
    assert isinstance(raised, PayloadTooLarge)
    assert peak < baseline + 4 * BOMB_LIMIT, f"held {peak} bytes at once"


def test_2_image_fetches_ask_for_an_uncompressed_body(
    bombs: LoopbackServer, bomb_settings: Settings
) -> None:
    watch = bombs.watch("/plain")
    assert fetch(bombs.url("/plain"), bomb_settings) == IMAGE
    assert watch.completed.is_set()
    assert bombs.requests[-1].headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize(
    "path", ["/image.gz", "/image.xgz", "/image.deflate", "/image.gz.gz", "/image.id.gz"]
)
def test_2_a_gzip_or_deflate_body_sent_anyway_is_decoded(
    bombs: LoopbackServer, bomb_settings: Settings, path: str
) -> None:
    assert fetch(bombs.url(path), bomb_settings) == IMAGE


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/too-big.gz", "larger than 65536 bytes"),
        ("/three.gz", "compressed 3 times over"),
        ("/br", "compressed as br"),
        ("/zstd", "compressed as zstd"),
        ("/unknown", "compressed as x-mystery"),
        ("/corrupt.gz", "gzip body is corrupt"),
        ("/truncated.gz", "gzip body is truncated"),
    ],
)
def test_2_other_codings_and_broken_streams_are_refused_clearly(
    bombs: LoopbackServer, bomb_settings: Settings, path: str, why: str
) -> None:
    with pytest.raises(InvalidInput, match=why) as refused:
        fetch(bombs.url(path), bomb_settings)
    assert refused.value.field == "image"


# -- 3. metadata that was accepted, then failed the job ---------------------------------------

MB = 2**20
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def padded_profile(size: int) -> bytes:
    """A real sRGB profile padded with random bytes to `size` (incompressible, as the
    tables of a large real profile; LittleCMS reads the header's size and tag table)."""
    return SRGB + random.Random(size).randbytes(size - len(SRGB))


def swapped_primaries() -> bytes:
    """sRGB with the red and blue primaries swapped: red pixels tagged so are blue."""
    profile = bytearray(SRGB)
    red, blue = profile.index(b"rXYZ"), profile.index(b"bXYZ")
    profile[red + 4 : red + 8], profile[blue + 4 : blue + 8] = (
        profile[blue + 4 : blue + 8],
        profile[red + 4 : red + 8],
    )
    return bytes(profile)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def big_chunks_png(kind: str, size: int = 2 * MB) -> bytes:
    """A 64x64 PNG with one large metadata chunk of `kind`."""
    image, info = Image.new("RGB", (64, 64), (20, 160, 60)), PngImagePlugin.PngInfo()
    filler = random.Random(1).randbytes(size // 2).hex()  # text, and incompressible
    options: dict[str, object] = {"pnginfo": info}
    if kind == "tEXt":
        info.add_text("Comment", filler)
    elif kind == "zTXt":
        info.add_text("Comment", filler, zip=True)
    elif kind == "iTXt":
        info.add_itxt("Comment", filler, zip=True)
    elif kind == "eXIf":
        options["exif"] = b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + bytes(size)
    elif kind == "iCCP":
        options["icc_profile"] = padded_profile(size)
    return encode(image, "PNG", **options)


def layout_of(data: bytes) -> bytes:
    """What the service stores for a job: decoded at submission, PNG-encoded."""
    return png_bytes(decode_image(data, max_pixels=40_000_000, reduce_to=(256, 256)))


def test_3_a_64px_layout_with_a_5mb_profile_is_small_and_carries_no_metadata() -> None:
    jpeg = encode(
        Image.new("RGB", (64, 64), (200, 40, 40)), "JPEG", icc_profile=padded_profile(5 * MB)
    )
    layout = layout_of(jpeg)
    assert len(layout) < 4096, f"{len(layout)} bytes"  # was 5,244,587
    stored = Image.open(io.BytesIO(layout))
    assert stored.info == {} and stored.size == (64, 64)
    assert decode_image(layout, max_pixels=4096).getpixel((0, 0)) == stored.convert("RGB").getpixel(
        (0, 0)
    )


def test_3_an_embedded_profile_is_applied_to_srgb_before_it_is_dropped() -> None:
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    tagged = decode_image(encode(red, "PNG", icc_profile=swapped_primaries()), max_pixels=4096)
    assert tagged.getpixel((0, 0)) == (30, 30, 200) and tagged.info == {}
    plain = decode_image(encode(red, "PNG", icc_profile=SRGB), max_pixels=4096)
    assert plain.getpixel((0, 0)) == (200, 30, 30)


@pytest.mark.parametrize("profile", [b"not a profile" * 100, SRGB], ids=["garbage", "rgb-on-cmyk"])
def test_3_a_profile_that_cannot_apply_is_ignored_as_browsers_do(profile: bytes) -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 200, 200, 0))
    expected = decode_image(encode(cmyk, "JPEG"), max_pixels=4096)
    got = decode_image(encode(cmyk, "JPEG", icc_profile=profile), max_pixels=4096)
    assert got.tobytes() == expected.tobytes() and got.info == {}


@pytest.mark.parametrize("kind", ["tEXt", "eXIf"])
def test_3_a_png_with_a_big_plain_chunk_is_kept_as_pixels_only(kind: str) -> None:
    layout = layout_of(big_chunks_png(kind))
    assert len(layout) < 4096 and Image.open(io.BytesIO(layout)).info == {}


@pytest.mark.parametrize("kind", ["zTXt", "iTXt", "iCCP"])
def test_3_a_png_chunk_pil_will_not_inflate_is_refused_with_a_clear_message(kind: str) -> None:
    with pytest.raises(InvalidInput, match=r"carries metadata .* save it without it"):
        layout_of(big_chunks_png(kind))


@functools.cache
def variants() -> dict[str, bytes]:
    """The inputs that were accepted, then failed their jobs; and their neighbours."""
    return {
        "cmyk-jpeg-1.5mb-icc": encode(
            Image.new("CMYK", (64, 64), (0, 200, 200, 0)),
            "JPEG",
            icc_profile=padded_profile(3 * MB // 2),
        ),
        "webp-2mb-icc": encode(
            Image.new("RGB", (64, 64), (40, 40, 200)), "WEBP", icc_profile=padded_profile(2 * MB)
        ),
        "jpeg-5mb-icc": encode(
            Image.new("RGB", (64, 64), (200, 40, 40)), "JPEG", icc_profile=padded_profile(5 * MB)
        ),
        "png-800kb-iccp": big_chunks_png("iCCP", 800 * 1024),
        "png-2mb-text": big_chunks_png("tEXt"),
        "png-2mb-exif": big_chunks_png("eXIf"),
        "png-2mb-ztxt": big_chunks_png("zTXt"),
    }


REFUSED_AT_SUBMISSION = {"png-2mb-ztxt"}


@pytest.fixture(scope="module")
def metadata_host() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        for name, data in variants().items():
            server.route(f"/{name}", respond(200, data, {"Content-Type": "image/*"}))
        yield server


@pytest.mark.parametrize("transport", ["url", "data-uri", "base64"])
def test_3_images_with_metadata_either_run_or_are_refused_at_submission(
    running: RunningService, metadata_host: LoopbackServer, transport: str
) -> None:
    """Never accepted and then failed: every accepted job's layout reads back and runs."""
    outcomes = {}
    for name, data in variants().items():
        encoded_data = base64.b64encode(data).decode()
        image = {
            "url": metadata_host.url(f"/{name}"),
            "data-uri": "data:image/jpeg;base64," + encoded_data,
            "base64": encoded_data,
        }[transport]
        reply = running.mix(image=image, steps=2, seed=1)
        if reply.status_code == 200:
            outcomes[name] = running.wait_success(reply.json()["id"])["status"]
        else:
            assert reply.status_code == 422 and reply.json()["errors"]["image"], reply.text
            outcomes[name] = "refused"
    expected = {
        name: "refused" if name in REFUSED_AT_SUBMISSION else "success" for name in outcomes
    }
    assert outcomes == expected
