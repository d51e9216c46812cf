"""Bring-your-own S3: parsing update_s3 details, probing, uploading, and keeping secrets secret."""

from __future__ import annotations

import json
import socket
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import httpx
import pytest
from botocore.awsrequest import AWSResponse
from moto.core.authorization import enable_iam_authentication

from magicmix import errors
from magicmix.crypto import SecretBox
from magicmix.outputs.s3 import make_s3_client
from magicmix.outputs.user_bucket import PRESIGN_SECONDS, S3Details, UserBucket
from tests.s3_server import DUMMY_KEY_ID, DUMMY_SECRET, REGION

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PNG = b"\x89PNG\r\n\x1a\n fake image"
INFRA = Path(__file__).resolve().parents[1] / "infra"


def details(**fields: Any) -> S3Details:
    base = {"aws_access_key_id": DUMMY_KEY_ID, "aws_secret_access_key": DUMMY_SECRET}
    return S3Details.model_validate(base | fields)


def http_get(url: str) -> httpx.Response:
    with httpx.Client(trust_env=False) as client:  # loopback only, never via a proxy
        return client.get(url)


# --- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "bucket", "api_url", "region"),
    [
        ({"endpoint_url": "https://pics.s3.amazonaws.com"}, "pics", None, "us-east-1"),
        (
            {"endpoint_url": "https://pics.s3.eu-west-1.amazonaws.com/"},
            "pics",
            "https://s3.eu-west-1.amazonaws.com",
            "eu-west-1",
        ),
        (
            {"endpoint_url": "https://my.dotted.pics.s3-us-west-2.amazonaws.com"},
            "my.dotted.pics",
            "https://s3.us-west-2.amazonaws.com",
            "us-west-2",
        ),
        (
            {"endpoint_url": "https://s3.ap-south-1.amazonaws.com/pics"},
            "pics",
            "https://s3.ap-south-1.amazonaws.com",
            "ap-south-1",
        ),
        (
            {"endpoint_url": "http://minio.local:9000/pics", "region_name": "  "},
            "pics",
            "http://minio.local:9000",
            "us-east-1",
        ),
        (
            {"endpoint_url": "https://acct.r2.cloudflarestorage.com", "bucket": "pics"},
            "pics",
            "https://acct.r2.cloudflarestorage.com",
            "us-east-1",
        ),
        (
            {
                "endpoint_url": "https://pics.nyc3.digitaloceanspaces.com",
                "bucket": "pics",
                "region_name": "nyc3",
            },
            "pics",
            "https://nyc3.digitaloceanspaces.com",
            "nyc3",
        ),
        ({"bucket": "pics", "region_name": "eu-central-1"}, "pics", None, "eu-central-1"),
        ({"bucket": "pics", "endpoint_url": ""}, "pics", None, "us-east-1"),
        (
            {"endpoint_url": "https://host/pics", "bucket": "pics"},
            "pics",
            "https://host",
            "us-east-1",
        ),
    ],
)
def test_bucket_and_endpoint_are_resolved(
    fields: dict[str, str], bucket: str, api_url: str | None, region: str
) -> None:
    resolved = details(**fields)
    assert (resolved.bucket, resolved.api_url, resolved.region_name) == (bucket, api_url, region)


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"endpoint_url": "https://minio.example.com"}, "endpoint_url", "no bucket"),
        ({}, "endpoint_url", "no bucket"),
        ({"endpoint_url": "ftp://host/pics"}, "endpoint_url", "http(s) URL"),
        ({"endpoint_url": "https://host/pics/folder"}, "endpoint_url", "image_directory"),
        ({"endpoint_url": "https://me:pw@host/pics"}, "endpoint_url", "credentials"),
        ({"endpoint_url": "https://host/pics", "bucket": "other"}, "bucket", "differs"),
        ({"bucket": "a/b"}, "bucket", "not a valid bucket"),
        ({"bucket": "pics", "image_directory": "a/../b"}, "image_directory", "'..'"),
        ({"bucket": "pics", "public_url": "ftp://cdn"}, "public_url", "http(s)"),
        ({"bucket": "pics", "region_name": "moon base"}, "region_name", "not a valid region"),
        ({"bucket": "pics", "aws_access_key_id": " "}, "aws_access_key_id", "is required"),
        ({"bucket": "pics", "aws_secret_access_key": ""}, "aws_secret_access_key", "is required"),
    ],
)
def test_bad_details_name_the_field(fields: dict[str, str], field: str, words: str) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        details(**fields)
    assert info.value.field == field
    assert words in info.value.message


@pytest.mark.parametrize(
    ("given", "normalised"),
    [("", ""), ("/renders//2024/", "renders/2024"), ("\\a\\b", "a/b"), (" x ", "x")],
)
def test_image_directory_is_normalised(given: str, normalised: str) -> None:
    assert details(bucket="pics", image_directory=given).image_directory == normalised


def test_blank_optional_fields_mean_absent() -> None:
    resolved = details(endpoint_url="https://pics.s3.amazonaws.com", public_url="", bucket="")
    assert resolved.public_url is None
    assert resolved.bucket == "pics"


# --- secrets ----------------------------------------------------------------------------


def test_masked_hides_secrets() -> None:
    resolved = details(bucket="pics", public_url="https://cdn.example.com/")
    shown = resolved.masked()
    assert shown["aws_access_key_id"] == "AKIA****MPLE"
    assert shown["public_url"] == "https://cdn.example.com"
    text = json.dumps(shown) + repr(resolved) + str(resolved) + resolved.model_dump_json()
    assert DUMMY_SECRET not in text
    assert DUMMY_KEY_ID not in text


def test_encrypted_blob_roundtrips_without_secrets_in_clear() -> None:
    box = SecretBox(b"service secret")
    resolved = details(endpoint_url="http://minio.local:9000/pics", image_directory="out")
    blob = resolved.to_encrypted(box)
    assert DUMMY_SECRET not in blob and DUMMY_KEY_ID not in blob and "pics" not in blob
    back = S3Details.from_encrypted(box, blob)
    assert back.aws_secret_access_key.get_secret_value() == DUMMY_SECRET
    assert back.aws_access_key_id.get_secret_value() == DUMMY_KEY_ID
    assert back.masked() == resolved.masked()
    assert back.api_url == "http://minio.local:9000"
    with pytest.raises(errors.StorageError):
        S3Details.from_encrypted(SecretBox(b"another secret"), blob)


# --- probe ------------------------------------------------------------------------------


def test_probe_ok_leaves_nothing_behind(s3_server: str, s3_client: S3Client, bucket: str) -> None:
    UserBucket(
        details(endpoint_url=f"{s3_server}/{bucket}", image_directory="imgs"), allow_private=True
    ).probe()
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_probe_missing_bucket(s3_server: str) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        UserBucket(
            details(endpoint_url=f"{s3_server}/no-such-bucket-xyz"), allow_private=True
        ).probe()
    assert info.value.field == "bucket"
    assert info.value.message == "bucket 'no-such-bucket-xyz' does not exist"


def test_probe_bad_endpoint_fails_fast() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(errors.InvalidInput) as info:
        UserBucket(
            details(endpoint_url=f"http://127.0.0.1:{port}/pics"), allow_private=True
        ).probe()
    assert time.monotonic() - started < 10
    assert info.value.field == "endpoint_url"
    assert info.value.message.startswith(f"cannot reach endpoint_url http://127.0.0.1:{port}/pics")


@pytest.fixture
def iam_user(s3_server: str, bucket: str) -> Iterator[dict[str, str]]:
    """Real moto IAM credentials limited by infra/iam-user-bucket-policy.json to imgs/.

    moto checks signatures and policies only in IAM mode, which is switched on for the
    test's body only (the server runs in this process, so the switch is immediate).
    """
    iam = boto3.client(
        "iam",
        endpoint_url=s3_server,
        region_name=REGION,
        aws_access_key_id=DUMMY_KEY_ID,
        aws_secret_access_key=DUMMY_SECRET,
    )
    user = f"user-{bucket}"
    iam.create_user(UserName=user)
    policy = string.Template((INFRA / "iam-user-bucket-policy.json").read_text())
    iam.put_user_policy(
        UserName=user,
        PolicyName="magicmix",
        PolicyDocument=policy.substitute(BUCKET=bucket, PREFIX="imgs/"),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    with enable_iam_authentication():
        yield {
            "endpoint_url": f"{s3_server}/{bucket}",
            "aws_access_key_id": key["AccessKeyId"],
            "aws_secret_access_key": key["SecretAccessKey"],
            "image_directory": "imgs",
        }


def test_the_user_policy_is_enough_to_probe_and_upload(iam_user: dict[str, str]) -> None:
    user_bucket = UserBucket(
        details(**iam_user, public_url="https://cdn.example.com"), allow_private=True
    )
    user_bucket.probe()
    assert user_bucket.upload("1-a.png", PNG).note is None


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        (
            {"aws_secret_access_key": "wrong-secret"},
            "aws_secret_access_key",
            "SignatureDoesNotMatch",
        ),
        ({"aws_access_key_id": "AKIAUNKNOWNKEY000000"}, "aws_access_key_id", "InvalidAccessKeyId"),
        ({"image_directory": "elsewhere"}, "aws_access_key_id", "AccessDenied"),
    ],
)
def test_probe_access_denied(
    iam_user: dict[str, str], change: dict[str, str], field: str, code: str
) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        UserBucket(details(**(iam_user | change)), allow_private=True).probe()
    assert info.value.field == field
    assert f"access denied to bucket '{iam_user['endpoint_url'].rsplit('/', 1)[1]}' ({code})" in (
        info.value.message
    )
    assert "check aws_access_key_id/aws_secret_access_key" in info.value.message
    assert iam_user["aws_secret_access_key"] not in info.value.message


# --- upload -----------------------------------------------------------------------------


def test_upload_with_public_url(s3_server: str, s3_client: S3Client, bucket: str) -> None:
    public_url = f"{s3_server}/{bucket}/"
    user_bucket = UserBucket(
        details(endpoint_url=f"{s3_server}/{bucket}", public_url=public_url, image_directory="r/1"),
        allow_private=True,
    )
    result = user_bucket.upload("511-abc.png", PNG)
    assert result.key == "r/1/511-abc.png"
    assert result.url == f"{s3_server}/{bucket}/r/1/511-abc.png"
    assert result.note is None
    head = s3_client.head_object(Bucket=bucket, Key=result.key)
    assert head["ContentType"] == "image/png"
    response = http_get(result.url)  # anonymous: readable only thanks to the public-read ACL
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"


def test_upload_without_public_url_is_presigned(s3_server: str, bucket: str) -> None:
    result = UserBucket(details(endpoint_url=f"{s3_server}/{bucket}"), allow_private=True).upload(
        "7-x.png", PNG
    )
    assert result.key == "7-x.png"
    assert f"X-Amz-Expires={PRESIGN_SECONDS}" in result.url
    response = http_get(result.url)
    assert response.status_code == 200
    assert response.content == PNG
    assert http_get(f"{s3_server}/{bucket}/7-x.png").status_code == 403  # private otherwise


def refuse_acls(params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
    """A bucket with Object Ownership 'bucket owner enforced': any ACL is refused."""
    if "x-amz-acl" not in params["headers"]:
        return None
    error = {"Code": "AccessControlListNotSupported", "Message": "The bucket does not allow ACLs"}
    return AWSResponse(params["url"], 400, {}, None), {
        "Error": error,
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }


def test_upload_where_acls_are_refused(s3_server: str, s3_client: S3Client, bucket: str) -> None:
    resolved = details(endpoint_url=f"{s3_server}/{bucket}", public_url="https://cdn.example.com")
    client = make_s3_client(
        resolved.api_url,
        allow_private=True,
        region_name=REGION,
        access_key_id=DUMMY_KEY_ID,
        secret_access_key=DUMMY_SECRET,
    )
    client.meta.events.register("before-call.s3.PutObject", refuse_acls)
    result = UserBucket(resolved, allow_private=True, client=client).upload("9-z.png", PNG)
    assert result.url == "https://cdn.example.com/9-z.png"
    assert result.note is not None
    assert "refused the public-read ACL (AccessControlListNotSupported)" in result.note
    assert s3_client.get_object(Bucket=bucket, Key="9-z.png")["Body"].read() == PNG


def test_upload_failure_is_a_storage_error(s3_server: str) -> None:
    user_bucket = UserBucket(
        details(endpoint_url=f"{s3_server}/gone-bucket-xyz"), allow_private=True
    )
    with pytest.raises(errors.StorageError) as info:
        user_bucket.upload("1-a.png", PNG)
    assert "bucket 'gone-bucket-xyz' does not exist" in info.value.message
    assert DUMMY_SECRET not in info.value.message


def test_upload_refuses_paths() -> None:
    with pytest.raises(ValueError, match="plain file name"):
        UserBucket(details(bucket="pics"), allow_private=True).upload("../escape.png", PNG)
