"""Hostile world, round two: each attack that worked before, as a regression test.

Numbered as in the issue. Loopback only: names that rebind are answered by the resolver
stand-in of `test_ssrf_api.loopback_only`, which also refuses (and records) any
connection outside 127.0.0.0/8, so no test can reach another address even by mistake.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageFile

from magicmix.errors import InvalidInput
from magicmix.inputs import images
from magicmix.inputs.images import decode_image, decode_inline_image
from magicmix.inputs.netguard import check_url
from tests.conftest import make_layout_image
from tests.http_fixtures import LoopbackServer, respond
from tests.service_fixtures import API, MIX, RunningService, png, serve, service_settings
from tests.test_ssrf_api import loopback_only

PUBLIC_IP = "93.184.216.34"  # never connected to: the guard refuses first, loopback_only too


@pytest.fixture(scope="module")
def strict(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningService]:
    """A server as deployed: private URLs refused; short header and body deadlines."""
    settings = service_settings(
        tmp_path_factory.mktemp("round2"),
        tiny_model_dir,
        allow_private_urls=False,
        header_timeout_s=0.5,
        body_timeout_s=0.5,
    )
    with serve(settings) as running:
        yield running


def inline(image: Image.Image, fmt: str = "PNG") -> str:
    return "data:image/png;base64," + base64.b64encode(png(image, fmt)).decode()


FAST = {"width": 256, "height": 256, "steps": 2, "seed": 1}


# -- 1. S3 endpoint DNS rebinding ---------------------------------------------------------


def test_1_s3_endpoint_that_rebinds_to_loopback_is_refused_at_connect(
    strict: RunningService, s3_server: str, bucket: str
) -> None:
    """The name answers a public address to the check and 127.0.0.1 to the connection."""
    port = int(s3_server.rsplit(":", 1)[1])
    answers = iter([PUBLIC_IP] + ["127.0.0.1"] * 50)
    body = {
        "key": strict.key,
        "endpoint_url": f"http://rebind.test:{port}/{bucket}",
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": "x" * 20,
    }
    with loopback_only(fake_dns={"rebind.test": lambda: next(answers)}) as net:
        reply = strict.post(f"{API}/update_s3", body)
    assert reply.status_code == 422, reply.text
    assert "refused" in reply.json()["message"]
    assert net.attempts_to(port) == [], "the probe must never reach the loopback address"
    assert net.lookups.count("rebind.test") >= 2  # checked, then resolved again at connect


def test_1_the_probe_does_not_say_whether_an_internal_address_answers(
    strict: RunningService, s3_server: str, bucket: str
) -> None:
    """A listening and a closed internal port give the same answer: nothing is contacted."""
    listening = int(s3_server.rsplit(":", 1)[1])
    with LoopbackServer() as closed_soon:
        closed = closed_soon.port
    messages = []
    for port in (listening, closed):
        body = {
            "key": strict.key,
            "endpoint_url": f"http://internal.test:{port}/{bucket}",
            "aws_access_key_id": "AKIAEXAMPLE",
            "aws_secret_access_key": "x" * 20,
        }
        with loopback_only(fake_dns={"internal.test": "127.0.0.1"}) as net:
            reply = strict.post(f"{API}/update_s3", body)
        assert reply.status_code == 422 and net.attempts_to(port) == []
        messages.append(reply.json()["message"].replace(str(port), "PORT"))
    assert messages[0] == messages[1]


# -- 2. an unauthenticated body that costs seconds to parse -----------------------------


def test_2_a_huge_body_with_a_bogus_key_is_refused_unparsed(
    strict: RunningService, parses: list[int]
) -> None:
    attack = b'{"key": "not-a-key", "prompt": "x", "image": [' + b"[]," * 4_000_000 + b"[]]}"
    reply = strict.http.post(
        strict.base_url + MIX, content=attack, headers={"content-type": "application/json"}
    )
    assert reply.status_code == 401 and reply.json()["status"] == "error"
    assert parses == []  # refused from the raw bytes, never parsed


def test_2_a_valid_key_cannot_send_millions_of_containers(
    strict: RunningService, parses: list[int]
) -> None:
    attack = json.dumps({"key": strict.key, "prompt": "x", "image": [[]] * 200_000}).encode()
    reply = strict.http.post(
        strict.base_url + MIX, content=attack, headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422 and "JSON arrays and objects" in reply.json()["message"]
    assert parses == []


# -- 3. a small file that costs a gigabyte to decode ------------------------------------


def bomb_png() -> bytes:
    """6320x6320 RGBA, flat: about 170 KB on the wire, 160 MB decoded."""
    buffer = io.BytesIO()
    Image.new("RGBA", (6320, 6320), (10, 200, 30, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_3_an_image_over_the_decoded_memory_budget_is_refused_before_decoding(
    strict: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bomb_png()
    assert len(data) < 400_000
    loads: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def counting(self: ImageFile.ImageFile) -> Any:
        loads.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    image = "data:image/png;base64," + base64.b64encode(data).decode()
    reply = strict.mix(image=image, **FAST)
    assert reply.status_code == 413, reply.text
    assert "MiB to decode" in reply.json()["message"]
    assert (6320, 6320) not in loads  # refused from the header


def test_3_an_upload_is_decoded_once_and_kept_reduced(
    strict: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored: list[bytes] = []
    real_create = strict.service.lifecycle.create

    def capture(key_id: str, params: Any, image: bytes, **options: Any) -> Any:
        stored.append(image)
        return real_create(key_id, params, image, **options)

    decoded: list[int] = []
    real_decode = images._decode

    def counting(data: bytes, *args: Any) -> Any:
        decoded.append(len(data))
        return real_decode(data, *args)

    monkeypatch.setattr(strict.service.lifecycle, "create", capture)
    monkeypatch.setattr(images, "_decode", counting)
    upload = png(make_layout_image(2400, 1800))
    reply = strict.mix(image="data:image/png;base64," + base64.b64encode(upload).decode(), **FAST)
    assert reply.status_code == 200 and reply.json()["status"] == "success", reply.text
    assert decoded.count(len(upload)) == 1  # the upload once; the worker reads the small copy
    assert Image.open(io.BytesIO(stored[0])).size == (256, 192)


def test_3_jpeg_uploads_decode_at_a_reduced_scale() -> None:
    data = png(make_layout_image(4000, 3000), "JPEG")
    image = decode_image(data, max_pixels=10**8, max_decoded_bytes=40 * 2**20, reduce_to=(256, 256))
    assert image.size == (256, 192) and image.mode == "RGB"
    with pytest.raises(InvalidInput, match="MiB to decode"):  # without draft: 36 MB > 20 MiB
        decode_image(
            png(make_layout_image(4000, 3000)), max_pixels=10**8, max_decoded_bytes=20 * 2**20
        )


# -- 4. a lone surrogate ---------------------------------------------------------------


def test_4_a_lone_surrogate_is_a_422_before_any_fetch(strict: RunningService) -> None:
    with LoopbackServer() as host:
        host.route("/a.png", respond(200, png(make_layout_image()), {"Content-Type": "image/png"}))
        for field in ("track_id", "prompt", "negative_prompt", "webhook"):
            raw = json.dumps(
                {"key": strict.key, "prompt": "p", "image": host.url("/a.png"), field: "x"}
            ).replace('"x"', '"\\ud800"')
            reply = strict.http.post(
                strict.base_url + MIX, content=raw, headers={"content-type": "application/json"}
            )
            assert reply.status_code == 422, (field, reply.text)
            why = reply.json()["errors"][field].lower()
            assert "surrogate" in why or "unicode" in why, (field, why)
        assert host.requests == []


# -- 5. secrets in URLs reach no log line ----------------------------------------------


def test_5_query_strings_of_user_urls_reach_no_log_line(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with LoopbackServer() as host:
        host.route("/a.png", respond(200, png(make_layout_image()), {"Content-Type": "image/png"}))
        host.route("/hook", respond(200))
        settings = service_settings(tmp_path, tiny_model_dir, webhook_schedule=(0.0,))
        with caplog.at_level(logging.DEBUG), serve(settings) as app:
            logging.getLogger("httpx").setLevel(logging.DEBUG)
            reply = app.mix(
                image=host.url("/a.png?X-Amz-Signature=sig-secret-1&X-Amz-Credential=c"),
                webhook=host.url("/hook?token=hook-secret-2"),
                **FAST,
            ).json()
            assert reply["status"] == "success"
            app.wait_success(reply["id"])
            while not any(r.path.startswith("/hook") for r in host.requests):
                time.sleep(0.05)  # the webhook goes out after the reply; pytest's timeout guards
    messages = [record.getMessage() for record in caplog.records]
    assert any(str(host.port) in message for message in messages)  # URLs were logged...
    for secret in ("sig-secret-1", "hook-secret-2"):
        assert not [m for m in messages if secret in m], secret  # ...without their secrets


# -- 6. metadata addresses stay refused when private URLs are allowed ---------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://100.100.100.200/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://168.63.129.16/machine",
        "http://192.0.0.192/opc/v2/",
        "http://169.254.169.254/latest/meta-data/",
    ],
)
def test_6_metadata_addresses_are_refused_even_with_private_urls_allowed(url: str) -> None:
    with loopback_only() as net, pytest.raises(InvalidInput, match="metadata"):
        check_url(url, allow_private=True, field="image")
    assert net.connects == []


# -- 7. slow headers and slow bodies are cut off ----------------------------------------


def raw_connection(app: RunningService) -> socket.socket:
    port = int(app.base_url.rsplit(":", 1)[1])
    connection = socket.create_connection(("127.0.0.1", port))
    connection.settimeout(30)  # a guard only: the server must act long before
    return connection


def test_7_partial_headers_are_closed_by_the_server(strict: RunningService) -> None:
    with raw_connection(strict) as connection:
        connection.sendall(
            b"POST /api/v1/enterprise/image_editing/magic_mix HTTP/1.1\r\nHost: x\r\n"
        )
        assert connection.recv(1024) == b""  # closed by the server, not by our guard


def test_7_a_connection_that_sends_nothing_is_closed(strict: RunningService) -> None:
    with raw_connection(strict) as connection:
        assert connection.recv(1024) == b""


def test_7_a_body_that_never_arrives_gets_408(strict: RunningService) -> None:
    with raw_connection(strict) as connection:
        connection.sendall(
            b"POST /api/v1/enterprise/image_editing/magic_mix HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"key": '
        )
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := connection.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]


# -- 8. the smaller ones ---------------------------------------------------------------


def test_8_database_files_are_private(strict: RunningService) -> None:
    path = strict.settings.database_path
    files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    assert {p.name for p in files} >= {path.name, path.name + "-wal", path.name + "-shm"}
    for file in files:
        assert stat.S_IMODE(os.stat(file).st_mode) == 0o600, file
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_8_data_uris_in_any_case_and_unpadded_base64_are_images() -> None:
    data = png(make_layout_image(8, 8))
    plain = base64.b64encode(data).decode()
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    for value in (f"DATA:IMAGE/PNG;BASE64,{plain}", plain.rstrip("="), urlsafe):
        assert decode_inline_image(value, max_bytes=10**6) == data, value[:20]


def test_8_nan_is_called_what_it_is(strict: RunningService) -> None:
    raw = json.dumps({"key": strict.key, "prompt": "p", "image": "x"})[:-1] + ', "kmax": NaN}'
    reply = strict.http.post(
        strict.base_url + MIX, content=raw, headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422 and "finite number" in reply.json()["errors"]["kmax"]


# -- Idempotency-Key ---------------------------------------------------------------------


def test_concurrent_identical_submissions_make_one_job(strict: RunningService) -> None:
    body = {**FAST, "image": inline(make_layout_image(64, 64)), "prompt": "same", "seed": 5}
    headers = {"Idempotency-Key": "order-4711"}

    def send(_: int) -> httpx.Response:
        return strict.http.post(
            strict.base_url + MIX, json={**body, "key": strict.key}, headers=headers
        )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(send, range(8)))
    accepted = [r.json() for r in replies if r.status_code == 200]
    assert accepted and all(r.status_code in (200, 409) for r in replies)
    assert len({reply["id"] for reply in accepted}) == 1
    assert all(
        "still being accepted" in r.json()["message"] for r in replies if r.status_code == 409
    )
    again = send(0)
    assert again.status_code == 200 and again.json()["id"] == accepted[0]["id"]
    with strict.service.jobs.database.read() as connection:  # type: ignore[attr-defined]
        count = connection.exec_driver_sql(
            'SELECT COUNT(*) FROM jobs WHERE params LIKE \'%"prompt":"same"%\''
        ).scalar()
    assert count == 1


def test_the_same_key_with_another_body_is_refused(strict: RunningService) -> None:
    headers = {"Idempotency-Key": "order-4712"}
    image = inline(make_layout_image(64, 64))
    first = strict.http.post(
        strict.base_url + MIX,
        json={**FAST, "key": strict.key, "prompt": "a", "image": image},
        headers=headers,
    )
    assert first.status_code == 200
    other = strict.http.post(
        strict.base_url + MIX,
        json={**FAST, "key": strict.key, "prompt": "b", "image": image},
        headers=headers,
    )
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["errors"]


def test_keys_are_per_api_key_and_a_refused_request_frees_its_key(
    strict: RunningService,
) -> None:
    headers = {"Idempotency-Key": "shared-name"}
    image = inline(make_layout_image(64, 64))
    refused = strict.http.post(
        strict.base_url + MIX,
        json={**FAST, "key": strict.key, "prompt": "p", "image": "no"},
        headers=headers,
    )
    assert refused.status_code == 422  # not an image: no job, the key stays free
    mine = strict.http.post(
        strict.base_url + MIX,
        json={**FAST, "key": strict.key, "prompt": "p", "image": image},
        headers=headers,
    )
    theirs = strict.http.post(
        strict.base_url + MIX,
        json={**FAST, "key": strict.admin_key, "prompt": "p", "image": image},
        headers=headers,
    )
    assert mine.status_code == theirs.status_code == 200
    assert mine.json()["id"] != theirs.json()["id"]
