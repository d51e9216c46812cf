"""S3 clients for the service store and users' buckets: short timeouts, any S3-compatible server."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def is_aws_endpoint(endpoint_url: str | None) -> bool:
    """True for AWS itself (no endpoint, or an *.amazonaws.com host)."""
    if endpoint_url is None:
        return True
    host = urlsplit(endpoint_url).hostname or ""
    return host == "amazonaws.com" or host.endswith(".amazonaws.com")


def make_s3_client(
    endpoint_url: str | None,
    *,
    region_name: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> S3Client:
    """An S3 client that fails in seconds on a dead endpoint and speaks to any S3-compatible one.

    Custom endpoints get path-style addressing: most S3-compatible servers (MinIO, R2,
    loopback test servers) do not resolve bucket subdomains. Without explicit keys boto3
    uses its default chain (environment, role), which is how the service store is set up.
    """
    config = Config(
        connect_timeout=3,
        read_timeout=20,
        retries={"max_attempts": 2, "mode": "standard"},
        signature_version="s3v4",
        s3={"addressing_style": "auto" if is_aws_endpoint(endpoint_url) else "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region_name,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


def s3_error_code(err: Exception) -> str:
    """S3's error code ('NoSuchBucket', ...) or botocore's exception name; safe to show."""
    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Code", "Unknown"))
    return type(err).__name__
