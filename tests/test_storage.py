"""The output store interface, run against both stores, plus what only S3 has (batches, prefix)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from magicmix import errors
from magicmix.config import Settings
from magicmix.outputs.store import LocalStore, OutputStore, S3Store, open_store
from tests.s3_server import DUMMY_KEY_ID, DUMMY_SECRET, seed_objects

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PNG = b"\x89PNG\r\n\x1a\n fake image"
UNSAFE_NAMES = [
    "../x",
    "a/b",
    "",
    ".hidden",
    "..",
    "x/../y",
    "a\\b",
    "a..b",
    "/etc/passwd",
    "é.png",
]


def wait_for_cutoff() -> datetime:
    """Sleep past the next whole second and return it as the cutoff.

    S3's LastModified has one-second resolution, and file mtimes come from a coarse clock
    that may lag time.time() by a few ms: writes before the call are strictly older than
    the cutoff, writes after it are not.
    """
    now = time.time()
    boundary = math.floor(now) + 1
    time.sleep(boundary - now + 0.05)
    return datetime.fromtimestamp(boundary, UTC)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> OutputStore:
    if request.param == "local":
        return LocalStore(tmp_path / "outputs")
    s3_client: S3Client = request.getfixturevalue("s3_client")
    bucket: str = request.getfixturevalue("bucket")
    return S3Store(bucket, "outputs/", client=s3_client)


def test_put_get_roundtrip(store: OutputStore) -> None:
    store.put("511-abc.png", PNG)
    assert store.get("511-abc.png") == PNG
    store.put("511-abc.png", b"replaced")
    assert store.get("511-abc.png") == b"replaced"


def test_missing_name_is_not_found(store: OutputStore) -> None:
    with pytest.raises(errors.NotFound):
        store.get("nothing-here.png")


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_names_are_refused(store: OutputStore, name: str) -> None:
    with pytest.raises(errors.NotFound):
        store.put(name, PNG)
    with pytest.raises(errors.NotFound):
        store.get(name)


def test_delete_older_than_removes_exactly_the_old(store: OutputStore) -> None:
    old = ["1-a.png", "2-b.png", "3-c.png"]
    new = ["4-d.png", "5-e.png"]
    for name in old:
        store.put(name, PNG)
    cutoff = wait_for_cutoff()
    for name in new:
        store.put(name, PNG)

    assert store.delete_older_than(cutoff) == sorted(old)
    for name in old:
        with pytest.raises(errors.NotFound):
            store.get(name)
    for name in new:
        assert store.get(name) == PNG
    assert store.delete_older_than(cutoff) == []


def test_naive_cutoff_is_refused(store: OutputStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        store.delete_older_than(datetime.now())


def test_describe_has_no_secrets(store: OutputStore) -> None:
    text = store.describe()
    assert text
    assert DUMMY_SECRET not in text
    assert DUMMY_KEY_ID not in text


def test_local_store_ignores_foreign_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / ".tmp-half-written").write_bytes(b"x")
    (tmp_path / "subdir").mkdir()
    store.put("1-a.png", PNG)
    future = datetime.now(UTC) + timedelta(hours=1)
    assert store.delete_older_than(future) == ["1-a.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-half-written", "subdir"]


def test_local_store_failure_is_a_storage_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "outputs")
    (tmp_path / "outputs").rmdir()
    with pytest.raises(errors.StorageError, match=r"cannot write 1-a\.png"):
        store.put("1-a.png", PNG)
    with pytest.raises(errors.StorageError, match="cannot delete"):
        store.delete_older_than(datetime.now(UTC))


def test_s3_store_encrypts_and_types_objects(s3_client: S3Client, bucket: str) -> None:
    S3Store(bucket, "/outputs/", client=s3_client).put("1-a.png", PNG)
    head = s3_client.head_object(Bucket=bucket, Key="outputs/1-a.png")
    assert head["ContentType"] == "image/png"
    assert head["ServerSideEncryption"] == "AES256"


def test_s3_store_failure_is_a_safe_storage_error(s3_client: S3Client) -> None:
    store = S3Store("no-such-bucket-here", "outputs", client=s3_client)
    with pytest.raises(errors.StorageError, match="NoSuchBucket") as info:
        store.put("1-a.png", PNG)
    assert DUMMY_SECRET not in info.value.message


@pytest.fixture
def delete_batches(s3_client: S3Client) -> Iterator[list[int]]:
    """Sizes of the DeleteObjects calls the client makes."""
    sizes: list[int] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sizes.append(len(params["Delete"]["Objects"]))

    s3_client.meta.events.register("provide-client-params.s3.DeleteObjects", record)
    yield sizes
    s3_client.meta.events.unregister("provide-client-params.s3.DeleteObjects", record)


def test_s3_cleanup_at_scale_keeps_new_and_foreign_objects(
    s3_client: S3Client, make_bucket: Callable[[], str], delete_batches: list[int]
) -> None:
    bucket = make_bucket()
    expired = [f"outputs/{i}-old.png" for i in range(2100)]
    foreign = ["outputs-other/1.png", "outputs/nested/1.png", "outputs/.hidden", "root.png"]
    seed_objects(bucket, expired + foreign)
    cutoff = wait_for_cutoff()
    fresh = [f"outputs/{i}-new.png" for i in range(400)]
    seed_objects(bucket, fresh)

    removed = S3Store(bucket, "outputs", client=s3_client).delete_older_than(cutoff)

    assert removed == sorted(key.removeprefix("outputs/") for key in expired)
    assert delete_batches == [1000, 1000, 100]
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    left = {obj["Key"] for page in pages for obj in page.get("Contents", [])}
    assert left == set(fresh + foreign)


def test_open_store_local(tmp_path: Path) -> None:
    store = open_store(Settings(data_dir=tmp_path))
    assert isinstance(store, LocalStore)
    assert store.directory == tmp_path / "outputs"
    store.put("1-a.png", PNG)
    assert (tmp_path / "outputs" / "1-a.png").read_bytes() == PNG


def test_open_store_s3(s3_server: str, bucket: str, dummy_aws_env: dict[str, str]) -> None:
    settings = Settings(store_url=f"s3://{bucket}/outputs", s3_endpoint_url=s3_server)
    store = open_store(settings)
    assert isinstance(store, S3Store)
    store.put("1-a.png", PNG)
    assert store.get("1-a.png") == PNG
    assert store.describe().startswith(f"s3://{bucket}/outputs/")


@pytest.mark.parametrize("url", ["ftp://host/dir", "/just/a/path", "s3:///prefix"])
def test_open_store_refuses_unknown_urls(url: str) -> None:
    with pytest.raises(ValueError, match="MAGICMIX_STORE_URL"):
        open_store(Settings(store_url=url))
