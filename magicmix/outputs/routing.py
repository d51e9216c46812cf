"""Where a job's PNG goes, decided in one place: the key's own bucket, or the service store.

A key with S3 details (`update_s3`) gets its outputs in its bucket, never deleted by us;
if that bucket refuses at job time, the PNG goes to the service store instead and the
reply says why. A key without goes to the service store (`MAGICMIX_STORE_URL`: a folder,
or any S3-compatible bucket by configuration), whose outputs expire after the retention.
The runner asks `place`; the service asks `pending_links` (a processing reply's future
links), `describe` (system_details), `save` (update_s3) and `forget` (reset_s3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.errors import MagicMixError, StorageError
from magicmix.outputs.store import OutputStore, open_store
from magicmix.outputs.user_bucket import S3Details, UserBucket, check_s3_endpoint

log = logging.getLogger(__name__)


class DetailsStore(Protocol):
    """Where each key's S3 details live, encrypted (the key store does it)."""

    def get_s3(self, key_id: str) -> str | None: ...
    def set_s3(self, key_id: str, blob: str) -> None: ...
    def delete_s3(self, key_id: str) -> bool: ...


@dataclass(frozen=True)
class Placement:
    """Where one output went, and how to take it back (a finish refused after a cancel)."""

    url: str
    key: str  # its object key (user bucket) or file name (service store)
    stored_in: Literal["user", "service"]
    note: str | None
    undo: Callable[[], None]


class OutputRouter:
    """The one component that decides where outputs go and what replies say about it."""

    def __init__(
        self,
        *,
        settings: Settings,
        service: OutputStore,
        details: DetailsStore,
        box: SecretBox,
        service_url: Callable[[str], str],
    ) -> None:
        self.settings = settings
        self.service = service
        self._details = details
        self._box = box
        self._service_url = service_url  # where the service store's file `name` is served

    @classmethod
    def open(
        cls,
        settings: Settings,
        *,
        details: DetailsStore,
        box: SecretBox,
        service_url: Callable[[str], str],
    ) -> OutputRouter:
        """The router over the configured service store (`MAGICMIX_STORE_URL`)."""
        return cls(
            settings=settings,
            service=open_store(settings),
            details=details,
            box=box,
            service_url=service_url,
        )

    def place(self, key_id: str, name: str, data: bytes) -> Placement:
        """Store one output: the key's bucket when it has one, else (or when that bucket
        refuses) the service store; `StorageError` when the service store fails too."""
        note = None
        blob = self._details.get_s3(key_id)
        if blob:
            try:
                details = S3Details.from_encrypted(self._box, blob)
                check_s3_endpoint(details, self.settings)
                bucket = UserBucket(details, allow_private=self.settings.allow_private_urls)
                uploaded = bucket.upload(name, data)
            except MagicMixError as err:
                note = (
                    f"your S3 bucket refused the upload ({err.message}); the image was kept"
                    " in the service store instead and will be deleted after"
                    f" {self.settings.retention_hours:g} hours"
                )
                log.warning("output %s: user bucket upload failed, using the service store", name)
            else:
                return Placement(
                    uploaded.url,
                    uploaded.key,
                    "user",
                    uploaded.note,
                    lambda: bucket.delete(uploaded.key),
                )
        self.service.put(name, data)
        return Placement(
            self._service_url(name), name, "service", note, lambda: self.service.delete(name)
        )

    def pending_links(self, key_id: str, name: str) -> list[str]:
        """The URL an output will have, while its job runs: known only for the service
        store (a user bucket's URL may be presigned at upload)."""
        return [] if self._details.get_s3(key_id) else [self._service_url(name)]

    def describe(self, key_id: str) -> dict[str, Any] | None:
        """The key's saved S3 details as its owner may see them; None when there are none."""
        blob = self._details.get_s3(key_id)
        if not blob:
            return None
        try:
            return S3Details.from_encrypted(self._box, blob).masked()
        except StorageError as err:  # saved under another MAGICMIX_SECRET_KEY
            return {"error": err.message}

    def save(self, key_id: str, details: S3Details) -> str:
        """Prove the details work (write and delete a probe object), then keep them for the
        key's later outputs; where those will go."""
        # the probe must not become a way to scan internal hosts: check where boto3 connects
        check_s3_endpoint(details, self.settings)
        UserBucket(details, allow_private=self.settings.allow_private_urls).probe()
        self._details.set_s3(key_id, details.to_encrypted(self._box))
        log.info("key %s saved S3 details for bucket %s", key_id, details.bucket)
        return f"s3://{details.bucket}/{details.image_directory}".rstrip("/")

    def forget(self, key_id: str) -> bool:
        """Drop the key's S3 details: its later outputs go to the service store."""
        return self._details.delete_s3(key_id)
