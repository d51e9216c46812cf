"""The service's output store: where PNGs of keys without S3 details live for the retention time.

Two implementations behind one Protocol: a local directory (`file://DIR`) and a bucket
prefix (`s3://bucket/prefix`, the Modal deployment). Names are flat file names chosen by
the service; anything else is refused, so the GET route cannot be led out of the store.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from magicmix import errors
from magicmix.config import Settings
from magicmix.outputs.s3 import make_s3_client, s3_error_code

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
DELETE_BATCH = 1000  # the most keys one DeleteObjects call accepts


class OutputStore(Protocol):
    """Where outputs without a user bucket go; every method takes a flat, safe file name."""

    def put(self, name: str, data: bytes, content_type: str = "image/png") -> None: ...

    def get(self, name: str) -> bytes:
        """The stored bytes; errors.NotFound when absent or when the name is not a safe one."""
        ...

    def delete(self, name: str) -> None:
        """Remove one output; absent is fine."""
        ...

    def delete_older_than(self, cutoff: datetime) -> list[str]:
        """Remove outputs last written before `cutoff` (timezone-aware); return their names."""
        ...

    def describe(self) -> str:
        """Where the outputs go, for logs and system_details; never contains secrets."""
        ...


def is_safe_name(name: str) -> bool:
    """A plain file name: no separators, no leading dot, no '..'."""
    return _SAFE_NAME.fullmatch(name) is not None and ".." not in name


def _check_name(name: str) -> str:
    # NotFound rather than InvalidInput: to a client probing paths, a bad name is just absent.
    if not is_safe_name(name):
        raise errors.NotFound(f"{name[:64]!r} is not an output name")
    return name


def _check_cutoff(cutoff: datetime) -> None:
    # A naive cutoff would be read as local time by one store and fail to compare in the other.
    if cutoff.tzinfo is None:
        raise ValueError("cutoff must be timezone-aware")


class LocalStore:
    """A directory; a file's mtime is its age. Writes are atomic so readers never see half a PNG."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: bytes, content_type: str = "image/png") -> None:
        target = self.directory / _check_name(name)
        tmp = None
        try:
            # Temp names start with '.', never a valid output name: never served or listed.
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except OSError as err:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise errors.StorageError(f"cannot write {name} to the local store") from err

    def get(self, name: str) -> bytes:
        try:
            return (self.directory / _check_name(name)).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as err:
            raise errors.NotFound(f"output {name} not found") from err
        except OSError as err:
            raise errors.StorageError(f"cannot read {name} from the local store") from err

    def delete(self, name: str) -> None:
        try:
            (self.directory / _check_name(name)).unlink(missing_ok=True)
        except OSError as err:
            raise errors.StorageError(f"cannot remove {name} in the local store") from err

    def delete_older_than(self, cutoff: datetime) -> list[str]:
        _check_cutoff(cutoff)
        limit = cutoff.timestamp()
        removed = []
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if (
                        is_safe_name(entry.name)
                        and entry.is_file()
                        and entry.stat().st_mtime < limit
                    ):
                        # missing_ok: another cleanup (a second replica) may have got there first.
                        Path(entry.path).unlink(missing_ok=True)
                        removed.append(entry.name)
        except OSError as err:
            raise errors.StorageError("cannot delete expired outputs from the local store") from err
        return sorted(removed)

    def describe(self) -> str:
        return f"local directory {self.directory}"


class S3Store:
    """Objects under one prefix of the service bucket; LastModified is their age.

    Only keys that are the prefix plus a safe name are ever read or deleted, so a shared
    bucket's other objects (other prefixes, deeper "folders") are never touched.
    """

    def __init__(self, bucket: str, prefix: str, *, client: S3Client) -> None:
        self.bucket = bucket
        stripped = prefix.strip("/")
        self.prefix = f"{stripped}/" if stripped else ""
        self._client = client

    def _fail(self, action: str, err: Exception) -> errors.StorageError:
        code = s3_error_code(err)
        log.warning("service store %s failed: %s", action, code, extra={"store": self.describe()})
        return errors.StorageError(f"the output store could not {action} ({code})")

    def put(self, name: str, data: bytes, content_type: str = "image/png") -> None:
        key = self.prefix + _check_name(name)
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                ServerSideEncryption="AES256",
            )
        except (BotoCoreError, ClientError) as err:
            raise self._fail(f"store {name}", err) from err

    def get(self, name: str) -> bytes:
        key = self.prefix + _check_name(name)
        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as err:
            if s3_error_code(err) in {"NoSuchKey", "404"}:
                raise errors.NotFound(f"output {name} not found") from err
            raise self._fail(f"read {name}", err) from err
        except BotoCoreError as err:
            raise self._fail(f"read {name}", err) from err

    def delete(self, name: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.prefix + _check_name(name))
        except (BotoCoreError, ClientError) as err:
            raise self._fail(f"delete {name}", err) from err

    def delete_older_than(self, cutoff: datetime) -> list[str]:
        _check_cutoff(cutoff)
        removed: list[str] = []
        batch: list[ObjectIdentifierTypeDef] = []
        try:
            for key in self._expired_keys(cutoff):
                batch.append({"Key": key})
                if len(batch) == DELETE_BATCH:
                    removed += self._delete(batch)
                    batch = []
            if batch:
                removed += self._delete(batch)
        except (BotoCoreError, ClientError) as err:
            raise self._fail("delete expired outputs", err) from err
        return sorted(removed)

    def _expired_keys(self, cutoff: datetime) -> Iterator[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.prefix) :]
                if is_safe_name(name) and obj["LastModified"] < cutoff:
                    yield obj["Key"]

    def _delete(self, batch: list[ObjectIdentifierTypeDef]) -> list[str]:
        """Delete one batch; return the names actually removed (per-key failures are logged)."""
        reply = self._client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
        )
        failed = {e.get("Key", "") for e in reply.get("Errors", [])}
        if failed:
            log.warning("service store kept %d expired objects it could not delete", len(failed))
        return [o["Key"][len(self.prefix) :] for o in batch if o["Key"] not in failed]

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self._client.meta.endpoint_url}"


def open_store(settings: Settings) -> OutputStore:
    """The store named by MAGICMIX_STORE_URL: file://DIR or s3://bucket/prefix."""
    url = settings.effective_store_url
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStore(Path(url.removeprefix("file://")).expanduser())
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"MAGICMIX_STORE_URL {url!r} names no bucket: use s3://bucket/prefix")
        # the operator's own store: it may live on a private network (metadata stays refused)
        client = make_s3_client(settings.s3_endpoint_url, allow_private=True)
        return S3Store(parts.netloc, parts.path, client=client)
    raise ValueError(f"MAGICMIX_STORE_URL must be file://DIR or s3://bucket/prefix, not {url!r}")
