"""Pytest plugin: one loopback S3 server (moto) per session, and clients and buckets on it.

Everything stays on 127.0.0.1 with dummy credentials; moto keeps its state in this process.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, cast

import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

from rehearsal.loopback import DUMMY_AWS_ENV, DUMMY_KEY_ID, DUMMY_SECRET, REGION
from rehearsal.loopback import s3_client as loopback_client
from rehearsal.loopback import s3_server as loopback_s3

__all__ = ["DUMMY_KEY_ID", "DUMMY_SECRET", "REGION"]  # the tests import them from here

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto server on a free loopback port."""
    with loopback_s3() as endpoint:
        yield endpoint


@pytest.fixture
def dummy_aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point boto3's default credential chain at dummy keys for this test."""
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return DUMMY_AWS_ENV


@pytest.fixture
def s3_client(s3_server: str) -> S3Client:
    return cast("S3Client", loopback_client(s3_server))


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
