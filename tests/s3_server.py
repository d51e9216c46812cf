"""Pytest plugin: one loopback S3 server (moto) per session, and clients and buckets on it.

Everything stays on 127.0.0.1 with dummy credentials; moto keeps its state in this process.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import boto3
import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REGION = "us-east-1"
DUMMY_KEY_ID = "AKIAIOSFODNN7EXAMPLE"  # AWS's documentation example, not a real key
DUMMY_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


# boto3's default chain reads these: dummy keys, no profile files, no instance metadata.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto server on a free loopback port."""
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)  # a line per request would swamp failure reports
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug.setLevel(level)


@pytest.fixture
def dummy_aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point boto3's default credential chain at dummy keys for this test."""
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return DUMMY_AWS_ENV


@pytest.fixture
def s3_client(s3_server: str) -> S3Client:
    return boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name=REGION,
        aws_access_key_id=DUMMY_KEY_ID,
        aws_secret_access_key=DUMMY_SECRET,
    )


@pytest.fixture
def make_bucket(s3_client: S3Client) -> Callable[[], str]:
    """Create a fresh, uniquely named bucket; tests never share one."""

    def make() -> str:
        name = f"test-{uuid.uuid4().hex[:16]}"
        s3_client.create_bucket(Bucket=name)
        return name

    return make


@pytest.fixture
def bucket(make_bucket: Callable[[], str]) -> str:
    return make_bucket()


def seed_objects(bucket: str, keys: Iterable[str], body: bytes = b"x") -> None:
    """Write many objects straight into the in-process moto backend.

    An HTTP PUT costs ~6 ms here (client and server share two cores and one GIL), so
    thousands of them would dominate a test that only needs the objects to exist.
    """
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in keys:
        backend.put_object(bucket, key, body)
