"""The ModelsLab-compatible API end to end: real uvicorn, real SQLite, real PNGs."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import update
from standardwebhooks import Webhook

from magicmix.http.schemas import SEED_EXAMPLE
from magicmix.store.schema import jobs
from tests.conftest import make_layout_image
from tests.http_fixtures import LoopbackServer, free_port, respond
from tests.service_fixtures import (
    API,
    MIX,
    RunningService,
    png,
    serve,
    service_settings,
    sweep_now,
)

SEED_META_KEYS = {
    "H",
    "W",
    "file_prefix",
    "image",
    "kmax",
    "kmin",
    "mix_factor",
    "n_samples",
    "negative_prompt",
    "outdir",
    "prompt",
    "seed",
    "steps",
}


def test_seed_example_succeeds_with_a_768_png(
    running: RunningService, image_host: LoopbackServer
) -> None:
    body = {**SEED_EXAMPLE, "key": running.key, "image": image_host.url("/layout.jpg")}
    reply = running.post(MIX, body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["status"] == "success"
    assert isinstance(data["id"], int) and data["id"] > 0
    assert data["generationTime"] > 0
    assert set(data["meta"]) >= SEED_META_KEYS
    assert data["meta"]["seed"] == 1829183163 and data["meta"]["prompt"] == "Bed"
    assert data["meta"]["image"] == body["image"]
    (url,) = data["output"]
    image = Image.open(io.BytesIO(running.download(url)))
    assert image.format == "PNG" and image.size == (768, 768)


def test_same_seed_gives_same_png_bytes_through_the_api(
    running: RunningService, image_host: LoopbackServer
) -> None:
    first = running.mix(image=image_host.url("/layout.png"), seed=42).json()
    second = running.mix(image=image_host.url("/layout.png"), seed=42).json()
    assert first["id"] != second["id"]
    assert running.download(first["output"][0]) == running.download(second["output"][0])


def test_random_seed_is_reported_and_reproduces(
    running: RunningService, image_host: LoopbackServer
) -> None:
    first = running.mix(image=image_host.url("/layout.png"), seed=None).json()
    again = running.mix(image=image_host.url("/layout.png"), seed=first["meta"]["seed"]).json()
    assert running.download(first["output"][0]) == running.download(again["output"][0])


def test_inline_base64_and_data_uri_images(running: RunningService) -> None:
    import base64

    raw = base64.b64encode(png(make_layout_image())).decode()
    for value in (raw, f"data:image/png;base64,{raw}"):
        reply = running.mix(image=value, seed=3)
        assert reply.json()["status"] == "success", reply.text
        assert reply.json()["meta"]["image"].startswith("inline image")


def test_numbers_as_strings_and_unknown_fields_are_accepted(
    running: RunningService, image_host: LoopbackServer
) -> None:
    reply = running.mix(
        image=image_host.url("/layout.png"),
        steps="10",
        width="263",
        kmin="0.2",
        seed="7",
        some_future_field=True,
    )
    data = reply.json()
    assert data["status"] == "success", reply.text
    assert data["meta"]["W"] == 256 and data["meta"]["steps"] == 10


def test_a_prompt_cut_to_what_the_encoders_read_is_said_in_meta(
    running: RunningService, image_host: LoopbackServer
) -> None:
    """The tiny model's tokenizer makes a token of each character: 76 are one past CLIP's 75."""
    long_prompt = "a red circle on a white ground " * 4  # 124 characters, 96 tokens
    reply = running.mix(
        image=image_host.url("/layout.png"),
        prompt=long_prompt,
        negative_prompt="blurry",
        steps=2,
        seed=1,
    ).json()
    assert reply["status"] == "success", reply
    meta = reply["meta"]
    assert (meta["prompt_tokens"], meta["prompt_truncated"]) == (96, True)
    assert (meta["negative_prompt_tokens"], meta["negative_prompt_truncated"]) == (6, False)
    assert running.fetch(reply["id"]).json()["meta"] == meta  # kept with the job
    short = running.mix(image=image_host.url("/layout.png"), prompt="a red circle", steps=2)
    assert short.json()["meta"]["prompt_tokens"] == 10
    assert short.json()["meta"]["prompt_truncated"] is False


def test_slow_job_answers_processing_then_fetch_succeeds(
    tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer
) -> None:
    with serve(service_settings(tmp_path, tiny_model_dir, sync_wait_s=0)) as app:
        reply = app.mix(image=image_host.url("/layout.png"), seed=1)
        data = reply.json()
        assert reply.status_code == 200 and data["status"] == "processing", data
        assert data["output"] == [] and data["eta"] > 0
        assert data["fetch_result"].endswith(f"/image_editing/fetch/{data['id']}")
        assert set(data["meta"]) >= SEED_META_KEYS and data["meta"]["seed"] == 1
        final = app.wait_success(data["id"])
        assert final["status"] == "success"
        assert final["output"] == data["future_links"]
        assert Image.open(io.BytesIO(app.download(final["output"][0]))).size == (256, 256)


def test_eight_concurrent_requests_get_distinct_ids_and_all_succeed(
    running: RunningService, image_host: LoopbackServer
) -> None:
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(
                lambda i: running.mix(
                    image=image_host.url("/layout.png"), seed=i, prompt=f"prompt {i}"
                ).json(),
                range(8),
            )
        )
    assert all(r["status"] == "success" for r in replies), replies
    assert len({r["id"] for r in replies}) == 8
    assert len({r["output"][0] for r in replies}) == 8


# --- errors -------------------------------------------------------------------------


def test_bad_key_is_401(running: RunningService, image_host: LoopbackServer) -> None:
    reply = running.mix(key="nope", image=image_host.url("/layout.png"))
    assert reply.status_code == 401
    assert reply.json() == {"status": "error", "message": "invalid API key"}


def test_unknown_id_and_other_keys_job_are_404(
    running: RunningService, image_host: LoopbackServer
) -> None:
    assert running.fetch(999_999).status_code == 404
    job = running.mix(image=image_host.url("/layout.png"), seed=1).json()
    other = running.fetch(job["id"], key=running.admin_key)
    assert other.status_code == 404 and other.json()["status"] == "error"
    assert running.fetch(job["id"]).json()["status"] == "success"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"width": 100}, "width"),
        ({"height": 2048}, "height"),
        ({"kmin": -0.1}, "kmin"),
        ({"kmax": 1.5}, "kmax"),
        ({"kmin": 0.8, "kmax": 0.5}, "kmax"),
        ({"mix_factor": 2}, "mix_factor"),
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps"),
        ({"samples": 2}, "samples"),
        ({"seed": -5}, "seed"),
        ({"steps": "many"}, "steps"),
        ({"guidance_scale": 100}, "guidance_scale"),
        ({"steps": 1}, "kmax"),
        ({"image": None}, "image"),
        ({"webhook": "ftp://example.invalid/x"}, "webhook"),
    ],
)
def test_each_invalid_field_is_422_naming_it(
    running: RunningService, image_host: LoopbackServer, fields: dict, field: str
) -> None:
    reply = running.mix(**{"image": image_host.url("/layout.png"), **fields})
    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert body["status"] == "error" and field in body["errors"], body
    assert "Traceback" not in reply.text


def test_missing_fields_and_bad_json_are_422(running: RunningService) -> None:
    reply = running.post(MIX, {"key": running.key})
    assert reply.status_code == 422 and {"prompt", "image"} <= set(reply.json()["errors"])
    broken = b'{"key": "%s", not json' % running.key.encode()
    raw = running.http.post(
        running.base_url + MIX, content=broken, headers={"Content-Type": "application/json"}
    )
    assert raw.status_code == 422 and raw.json()["errors"] == {"body": raw.json()["errors"]["body"]}


def test_non_image_is_422(running: RunningService, image_host: LoopbackServer) -> None:
    reply = running.mix(image=image_host.url("/notimage.txt"))
    assert reply.status_code == 422 and "image" in reply.json()["errors"]


def test_oversize_image_is_413(tmp_path: Path, tiny_model_dir: Path) -> None:
    big = png(make_layout_image(2000, 2000))
    with (
        LoopbackServer() as host,
        serve(service_settings(tmp_path, tiny_model_dir, max_image_bytes=len(big) - 1)) as app,
    ):
        host.route("/big.png", respond(200, big, {"Content-Type": "image/png"}))
        reply = app.mix(image=host.url("/big.png"))
        assert reply.status_code == 413 and reply.json()["status"] == "error"
        pixels = app.mix(image=host.url("/big.png"))
        assert pixels.status_code == 413


def test_request_body_over_the_limit_is_413(tmp_path: Path, tiny_model_dir: Path) -> None:
    with serve(service_settings(tmp_path, tiny_model_dir, max_body_bytes=4096)) as app:
        reply = app.mix(image="A" * 10_000)
        assert reply.status_code == 413 and reply.json()["status"] == "error"


def test_chunked_body_over_the_limit_is_413(tmp_path: Path, tiny_model_dir: Path) -> None:
    """No Content-Length to trust: the limit is enforced while the body streams in."""
    with serve(service_settings(tmp_path, tiny_model_dir, max_body_bytes=4096)) as app:

        def chunks():  # type: ignore[no-untyped-def]
            yield b'{"key": "' + b"A" * 3000
            yield b"A" * 3000 + b'"}'

        reply = app.http.post(
            app.base_url + f"{API}/image_editing/system_details",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert reply.status_code == 413 and reply.json()["status"] == "error", reply.text


def test_private_url_is_refused_when_not_allowed(
    tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer
) -> None:
    with serve(service_settings(tmp_path, tiny_model_dir, allow_private_urls=False)) as app:
        reply = app.mix(image=image_host.url("/layout.png"))
        assert reply.status_code == 422 and "image" in reply.json()["errors"]
        assert not any(
            r.path == "/layout.png" and r.headers.get("X-Probe") for r in image_host.requests
        )
        hook = app.mix(
            image=f"data:image/png;base64,{_b64_layout()}", webhook="http://127.0.0.1:9/hook"
        )
        assert hook.status_code == 422 and "webhook" in hook.json()["errors"]


def _b64_layout() -> str:
    import base64

    return base64.b64encode(png(make_layout_image())).decode()


def test_unknown_route_answers_in_the_error_shape(running: RunningService) -> None:
    reply = running.post(f"{API}/no_such_route", {"key": running.key})
    assert reply.status_code == 404 and reply.json()["status"] == "error"


# --- system routes --------------------------------------------------------------------


def test_system_details_reports_the_engine_and_the_keys_webhook_secret(
    running: RunningService,
) -> None:
    body = running.post(f"{API}/image_editing/system_details", {"key": running.key}).json()
    assert body["status"] == "success"
    assert body["device"] == "cpu" and body["dtype"] == "float32"
    assert body["webhook_secret"].startswith("whsec_")
    assert isinstance(body["queue_length"], int) and body["version"]


@pytest.mark.parametrize(
    "route", ["clear_queue", "clear_cache", "restart_server", "update_server", "update"]
)
def test_admin_routes_need_an_admin_key(running: RunningService, route: str) -> None:
    path = f"{API}/image_editing/{route}"
    assert running.post(path, {"key": running.key}).status_code == 403
    reply = running.post(path, {"key": running.admin_key})
    assert reply.json()["message"]
    if route.startswith("update"):
        assert reply.status_code == 501 and "redeploy" in reply.json()["message"]
    else:
        assert reply.status_code == 200 and reply.json()["status"] == "success"


def test_clear_queue_cancels_queued_jobs(
    tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer
) -> None:
    # the worker waits 3 s before claiming, so every job is still queued when we clear
    settings = service_settings(tmp_path, tiny_model_dir, sync_wait_s=0, batch_wait_ms=3000)
    with serve(settings) as app:
        ids = [app.mix(image=image_host.url("/layout.png"), seed=i).json()["id"] for i in range(3)]
        cleared = app.post(f"{API}/image_editing/clear_queue", {"key": app.admin_key}).json()
        assert cleared == {"status": "success", "message": "cancelled 3 queued jobs"}
        for job_id in ids:
            final = app.fetch(job_id).json()
            assert final["status"] == "failed" and "cancelled" in final["message"], final
        after = app.mix(image=image_host.url("/layout.png"), seed=9).json()
        assert app.wait_success(after["id"])["status"] == "success"  # still serving


# --- webhooks -------------------------------------------------------------------------


def test_webhook_is_signed_and_carries_track_id(
    running: RunningService, image_host: LoopbackServer
) -> None:
    secret = running.post(f"{API}/image_editing/system_details", {"key": running.key}).json()[
        "webhook_secret"
    ]
    with LoopbackServer() as receiver:
        receiver.route("/hook", respond(200, b"ok"))
        reply = running.mix(
            image=image_host.url("/layout.png"),
            seed=1,
            webhook=receiver.url("/hook"),
            track_id="order-17",
        ).json()
        assert reply["status"] == "success"
        _wait_for(lambda: receiver.requests)
        (request,) = receiver.requests
        payload = Webhook(secret).verify(request.body, request.headers)
        assert payload["track_id"] == "order-17" and payload["id"] == reply["id"]
        assert payload["status"] == "success" and payload["output"] == reply["output"]


def test_webhook_receiver_down_is_retried_and_job_stays_fetchable(
    running: RunningService, image_host: LoopbackServer
) -> None:
    with LoopbackServer() as receiver:
        receiver.route("/hook", respond(503, b"down"))
        reply = running.mix(
            image=image_host.url("/layout.png"), seed=1, webhook=receiver.url("/hook")
        ).json()
        attempts = len(running.settings.webhook_schedule)
        _wait_for(lambda: len(receiver.requests) >= attempts, timeout=20)
        ids = {r.headers.get("webhook-id") for r in receiver.requests}
        assert len(ids) == 1  # the same message id on every retry
    assert running.fetch(reply["id"]).json()["status"] == "success"
    _wait_for(lambda: running.service.jobs.get(reply["id"]).webhook.phase == "failed")
    assert running.service.jobs.get(reply["id"]).webhook.attempts == attempts


def _wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- outputs and cleanup --------------------------------------------------------------


def test_outputs_route_refuses_traversal_and_unknown_names(running: RunningService) -> None:
    for name in ("..%2F..%2Fetc%2Fpasswd", "%2E%2E", "nope.png", ".hidden"):
        response = running.http.get(f"{running.base_url}/outputs/{name}")
        assert response.status_code in (404, 422), name
        assert b"root:" not in response.content


def test_cleanup_removes_only_expired_outputs(
    running: RunningService, image_host: LoopbackServer
) -> None:
    import os
    import time

    old = running.mix(image=image_host.url("/layout.png"), seed=11).json()
    new = running.mix(image=image_host.url("/layout.png"), seed=12).json()
    old_name = old["output"][0].rsplit("/", 1)[1]
    old_path = running.settings.data_dir / "outputs" / old_name
    past = time.time() - 25 * 3600
    os.utime(old_path, (past, past))
    with running.service.jobs.database.transaction() as connection:  # type: ignore[attr-defined]
        connection.execute(  # the job finished 25 h ago, too
            update(jobs).where(jobs.c.id == old["id"]).values(finished_at=past)
        )
    report = sweep_now(running.service)
    assert old_name in report.removed and old["id"] in report.expired
    assert new["output"][0].rsplit("/", 1)[1] not in report.removed
    gone = running.fetch(old["id"])
    assert gone.status_code == 410 and "deleted after 24 hours" in gone.json()["message"]
    assert running.http.get(old["output"][0]).status_code == 404
    assert running.download(new["output"][0])


def test_openapi_documents_every_route(running: RunningService) -> None:
    spec = running.http.get(running.base_url + "/openapi.json").json()
    paths = set(spec["paths"])
    for route in (
        "image_editing/magic_mix",
        "image_editing/fetch/{job_id}",
        "image_editing/system_details",
        "image_editing/clear_queue",
        "image_editing/clear_cache",
        "image_editing/restart_server",
        "image_editing/update_server",
        "update_s3",
        "reset_s3",
    ):
        assert f"{API}/{route}" in paths, route
    assert "example" in json.dumps(spec["components"]["schemas"]["MagicMixIn"])
    assert running.http.get(running.base_url + "/docs").status_code == 200
    assert running.http.get(running.base_url + "/healthz").json()["status"] == "ok"


def test_port_helper_gives_a_free_port() -> None:
    port = free_port()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
