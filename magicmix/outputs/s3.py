"""S3 clients for the service store and users' buckets, sending through the SSRF guard.

boto3 resolves and connects by itself, so a check of the endpoint before a call is not
enough: a name can answer a public address to the check and 127.0.0.1 to boto3 (DNS
rebinding). Every client made here therefore sends its requests itself, through
`netguard.guarded_client` (resolve, check, connect to the checked address), via
botocore's `before-send` event, which lets a handler answer a request instead of
botocore's own HTTP stack. Signing, retries and parsing stay botocore's.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import boto3
import httpx
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from urllib3.response import HTTPResponse

from magicmix.inputs.netguard import guarded_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 20.0


def is_aws_endpoint(endpoint_url: str | None) -> bool:
    """True for AWS itself (no endpoint, or an *.amazonaws.com host)."""
    if endpoint_url is None:
        return True
    host = urlsplit(endpoint_url).hostname or ""
    return host == "amazonaws.com" or host.endswith(".amazonaws.com")


class GuardedSender:
    """botocore's `before-send` handler: the request goes out through the SSRF guard."""

    def __init__(self, *, allow_private: bool) -> None:
        self._http = guarded_client(
            allow_private=allow_private,
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        )

    def __call__(self, request: AWSPreparedRequest, **_: Any) -> AWSResponse:
        body = request.body
        if body is not None and not isinstance(body, str | bytes | bytearray):
            body = body.read()  # a file-like body (botocore wraps some uploads)
        content = body.encode() if isinstance(body, str) else bytes(body or b"")
        url = request.url
        headers = {k: v for k, v in request.headers.items() if k.lower() != "expect"}
        try:
            response = self._http.request(request.method, url, content=content, headers=headers)
        except httpx.ConnectTimeout as err:
            raise ConnectTimeoutError(endpoint_url=url, error=err) from err
        except httpx.TimeoutException as err:
            raise ReadTimeoutError(endpoint_url=url, error=err) from err
        except httpx.ConnectError as err:
            raise EndpointConnectionError(endpoint_url=url, error=err) from err
        except httpx.TransportError as err:
            raise ConnectionClosedError(endpoint_url=url) from err
        headers_out = dict(response.headers)
        raw = HTTPResponse(
            body=io.BytesIO(response.content),
            headers=headers_out,
            status=response.status_code,
            preload_content=False,
            decode_content=False,
        )
        # AWSResponse copies any mapping into its own HeadersDict; the stubs ask for more
        return AWSResponse(url, response.status_code, headers_out, raw)  # type: ignore[arg-type]


def make_s3_client(
    endpoint_url: str | None,
    *,
    allow_private: bool,
    region_name: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> S3Client:
    """An S3 client that fails in seconds on a dead endpoint and speaks to any S3-compatible one.

    Custom endpoints get path-style addressing: most S3-compatible servers (MinIO, R2,
    loopback test servers) do not resolve bucket subdomains. Without explicit keys boto3
    uses its default chain (environment, role), which is how the service store is set up.
    `allow_private` says whether the endpoint may be on a private network (the operator's
    own store may; a user's bucket only with MAGICMIX_ALLOW_PRIVATE_URLS).
    """
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": 2, "mode": "standard"},
        signature_version="s3v4",
        s3={"addressing_style": "auto" if is_aws_endpoint(endpoint_url) else "path"},
    )
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region_name,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )
    # the stubs type handlers as returning None; a before-send handler returns the response
    sender = GuardedSender(allow_private=allow_private)
    client.meta.events.register("before-send.s3", sender)  # type: ignore[arg-type]
    return client


def s3_error_code(err: Exception) -> str:
    """S3's error code ('NoSuchBucket', ...) or botocore's exception name; safe to show."""
    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Code", "Unknown"))
    return type(err).__name__
