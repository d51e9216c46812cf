"""Bring-your-own S3 through the API, against a real S3-protocol server on loopback."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from mypy_boto3_s3 import S3Client
from PIL import Image
from sqlalchemy import update

from magicmix.store.schema import jobs
from tests.http_fixtures import LoopbackServer
from tests.s3_server import DUMMY_KEY_ID, DUMMY_SECRET
from tests.service_fixtures import API, RunningService, serve, service_settings, sweep_now


def s3_body(
    running: RunningService, s3_server: str, bucket_name: str | None, **overrides: object
) -> dict:
    body = {
        "key": running.key,
        "deploy_type": "image_editing",
        "region_name": "us-east-1",
        "endpoint_url": s3_server,
        "bucket": bucket_name,
        "aws_access_key_id": DUMMY_KEY_ID,
        "aws_secret_access_key": DUMMY_SECRET,
        "image_directory": "magicmix/out",
    }
    body.update(overrides)
    return body


@pytest.fixture
def app(
    tmp_path: Path, tiny_model_dir: Path, dummy_aws_env: dict[str, str], image_host: LoopbackServer
):  # type: ignore[no-untyped-def]
    with serve(service_settings(tmp_path, tiny_model_dir)) as running:
        yield running


def test_update_s3_then_magic_mix_lands_in_the_users_bucket(
    app: RunningService,
    s3_server: str,
    bucket: str,
    s3_client: S3Client,
    image_host: LoopbackServer,
) -> None:
    public = f"{s3_server}/{bucket}"
    saved = app.post(f"{API}/update_s3", s3_body(app, s3_server, bucket, public_url=public))
    assert saved.status_code == 200 and saved.json()["status"] == "success", saved.text
    assert DUMMY_SECRET not in saved.text
    reply = app.mix(image=image_host.url("/layout.png"), seed=5).json()
    assert reply["status"] == "success", reply
    (url,) = reply["output"]
    assert url.startswith(public + "/magicmix/out/")
    key = url.removeprefix(public + "/")
    head = s3_client.head_object(Bucket=bucket, Key=key)
    assert head["ContentType"] == "image/png"
    assert Image.open(io.BytesIO(app.download(url))).size == (256, 256)
    # the service store holds nothing for this job: the bucket is the only copy
    assert not list((app.settings.data_dir / "outputs").glob(f"{reply['id']}-*"))


def test_without_public_url_the_output_is_a_presigned_url(
    app: RunningService, s3_server: str, bucket: str, image_host: LoopbackServer
) -> None:
    assert app.post(f"{API}/update_s3", s3_body(app, s3_server, bucket)).status_code == 200
    reply = app.mix(image=image_host.url("/layout.png"), seed=5).json()
    assert "X-Amz-Signature" in reply["output"][0]
    assert app.download(reply["output"][0]).startswith(b"\x89PNG")


def test_bucket_taken_from_a_path_style_endpoint_url(
    app: RunningService, s3_server: str, bucket: str, image_host: LoopbackServer
) -> None:
    body = s3_body(app, s3_server, None, endpoint_url=f"{s3_server}/{bucket}")
    assert app.post(f"{API}/update_s3", body).status_code == 200
    details = app.post(f"{API}/image_editing/system_details", {"key": app.key}).json()
    assert details["s3"]["bucket"] == bucket
    assert DUMMY_SECRET not in str(details)


def test_missing_bucket_is_a_clear_error_and_nothing_is_saved(
    app: RunningService, s3_server: str
) -> None:
    reply = app.post(f"{API}/update_s3", s3_body(app, s3_server, "no-such-bucket-here"))
    assert reply.status_code == 422
    assert "does not exist" in reply.json()["message"]
    details = app.post(f"{API}/image_editing/system_details", {"key": app.key}).json()
    assert details["s3"] is None


def test_unreachable_endpoint_is_a_clear_error(app: RunningService) -> None:
    from tests.http_fixtures import free_port

    body = s3_body(app, f"http://127.0.0.1:{free_port()}", "some-bucket")
    reply = app.post(f"{API}/update_s3", body)
    assert reply.status_code == 422 and "endpoint_url" in reply.json()["errors"]


def test_private_endpoint_is_refused_when_private_urls_are_not_allowed(
    tmp_path: Path, tiny_model_dir: Path, s3_server: str, bucket: str
) -> None:
    with serve(service_settings(tmp_path, tiny_model_dir, allow_private_urls=False)) as app:
        reply = app.post(f"{API}/update_s3", s3_body(app, s3_server, bucket))
        assert reply.status_code == 422 and "endpoint_url" in reply.json()["errors"]


def test_stored_credentials_are_not_readable_in_the_database(
    app: RunningService, s3_server: str, bucket: str
) -> None:
    assert app.post(f"{API}/update_s3", s3_body(app, s3_server, bucket)).status_code == 200
    database = app.settings.database_path
    raw = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    assert DUMMY_SECRET.encode() not in raw and DUMMY_KEY_ID.encode() not in raw
    assert app.key.encode() not in raw


def test_bucket_refusing_at_job_time_falls_back_with_the_reason(
    app: RunningService,
    s3_server: str,
    bucket: str,
    s3_client: S3Client,
    image_host: LoopbackServer,
) -> None:
    assert app.post(f"{API}/update_s3", s3_body(app, s3_server, bucket)).status_code == 200
    s3_client.delete_bucket(Bucket=bucket)  # the user's bucket disappears after saving
    reply = app.mix(image=image_host.url("/layout.png"), seed=5).json()
    assert reply["status"] == "success", reply
    assert "refused" in reply["message"] and "24 hours" in reply["message"]
    assert reply["output"][0].startswith(app.base_url + "/outputs/")
    assert app.download(reply["output"][0]).startswith(b"\x89PNG")


def test_reset_s3_forgets_the_details(
    app: RunningService, s3_server: str, bucket: str, image_host: LoopbackServer
) -> None:
    assert app.post(f"{API}/update_s3", s3_body(app, s3_server, bucket)).status_code == 200
    reset = app.post(f"{API}/reset_s3", {"key": app.key, "deploy_type": "image_editing"})
    assert reset.json()["status"] == "success" and "removed" in reset.json()["message"]
    reply = app.mix(image=image_host.url("/layout.png"), seed=5).json()
    assert reply["output"][0].startswith(app.base_url + "/outputs/")


def test_service_store_on_s3_serves_and_expires_outputs(
    tmp_path: Path,
    tiny_model_dir: Path,
    s3_server: str,
    bucket: str,
    s3_client: S3Client,
    dummy_aws_env: dict[str, str],
    image_host: LoopbackServer,
) -> None:
    settings = service_settings(
        tmp_path, tiny_model_dir, store_url=f"s3://{bucket}/outputs", s3_endpoint_url=s3_server
    )
    s3_client.put_object(Bucket=bucket, Key="elsewhere/keep.txt", Body=b"not ours")
    with serve(settings) as app:
        reply = app.mix(image=image_host.url("/layout.png"), seed=5).json()
        (url,) = reply["output"]
        name = url.rsplit("/", 1)[1]
        assert s3_client.head_object(Bucket=bucket, Key=f"outputs/{name}")
        assert app.download(url).startswith(b"\x89PNG")
        time.sleep(1.1)  # S3 LastModified has one-second resolution
        app.service.settings.retention_hours = 1 / 3600  # everything older than 1 s expires
        with app.service.jobs.database.transaction() as connection:  # type: ignore[attr-defined]
            connection.execute(
                update(jobs)
                .where(jobs.c.id == reply["id"])
                .values(finished_at=jobs.c.finished_at - 10)
            )
        report = sweep_now(app.service)
        assert report.removed == [name] and report.expired == [reply["id"]]
        assert app.http.get(url).status_code == 404
        assert app.fetch(reply["id"]).status_code == 410
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["elsewhere/keep.txt"]
    assert os.environ["AWS_ACCESS_KEY_ID"] == DUMMY_KEY_ID
