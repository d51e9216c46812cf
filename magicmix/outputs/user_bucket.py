"""Bring-your-own S3: the details update_s3 receives, and the user's bucket they open.

Outputs of a key with S3 details go to the user's bucket and are never deleted by us.
Before the details are saved, `UserBucket.probe()` proves they work, so a typo surfaces
as a clear error at update_s3 time rather than as a failed job later.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, urlsplit

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from magicmix import errors
from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.inputs.netguard import check_url
from magicmix.outputs.s3 import make_s3_client, s3_error_code
from magicmix.outputs.store import is_safe_name

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

PNG = "image/png"
PRESIGN_SECONDS = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
DEFAULT_REGION = "us-east-1"

# AWS hosts: virtual-host style BUCKET.s3[.REGION].amazonaws.com, or s3[.REGION].amazonaws.com.
_AWS_HOST = re.compile(r"(?:(?P<bucket>.+)\.)?s3(?:[.-](?P<region>[a-z0-9-]+))?\.amazonaws\.com")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}")
_REGION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # botocore's own rule
# Error codes that mean "these credentials may not do this", and the field most likely wrong.
_ACCESS_CODES = {
    "SignatureDoesNotMatch": "aws_secret_access_key",
    "InvalidAccessKeyId": "aws_access_key_id",
    "InvalidToken": "aws_access_key_id",
    "AccessDenied": "aws_access_key_id",
    "AllAccessDisabled": "aws_access_key_id",
    "403": "aws_access_key_id",
}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "301"}
_ACL_REFUSED_CODES = {"AccessControlListNotSupported", "AccessDenied"}


class _Endpoint(NamedTuple):
    bucket: str | None  # the bucket the URL names, if it names one
    api_url: str | None  # what boto3 talks to; None means AWS's default for the region
    region: str | None  # the region an AWS URL names


def _parse_endpoint(url: str, bucket: str | None) -> _Endpoint:
    """Read endpoint_url the way ModelsLab's examples write it (virtual-host or path style)."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise errors.InvalidInput(
            "endpoint_url must be an http(s) URL, e.g. https://BUCKET.s3.REGION.amazonaws.com "
            "or https://host/BUCKET",
            field="endpoint_url",
        )
    if parts.username or parts.password:
        raise errors.InvalidInput(
            "endpoint_url must not contain credentials; use the aws_* fields",
            field="endpoint_url",
        )
    host = parts.hostname
    segments = [s for s in parts.path.split("/") if s]
    aws = _AWS_HOST.fullmatch(host)
    host_bucket = aws["bucket"] if aws else None
    if len(segments) > (0 if host_bucket else 1):
        raise errors.InvalidInput(
            "endpoint_url may name the bucket but no folders; put folders in image_directory",
            field="endpoint_url",
        )
    url_bucket = host_bucket or (segments[0] if segments else None)
    if aws:
        region = aws["region"]
        return _Endpoint(
            url_bucket, f"https://s3.{region}.amazonaws.com" if region else None, region
        )
    netloc = parts.netloc
    if bucket and not segments and host.startswith(f"{bucket}."):
        netloc = netloc[len(bucket) + 1 :]  # a provider's virtual-host URL, bucket given apart
    return _Endpoint(url_bucket, f"{parts.scheme}://{netloc}", None)


_HIDDEN = "****"


def _mask(value: str) -> str:
    return f"{value[:4]}{_HIDDEN}{value[-4:]}" if len(value) >= 12 else _HIDDEN


class S3Details(BaseModel):
    """The update_s3 fields (ModelsLab's names), validated and with the bucket resolved."""

    model_config = ConfigDict(extra="ignore")

    deploy_type: str = "image_editing"
    public_url: str | None = None
    region_name: str | None = None
    endpoint_url: str | None = None
    aws_access_key_id: SecretStr
    aws_secret_access_key: SecretStr
    image_directory: str = ""
    bucket: str | None = None

    _api_url: str | None = PrivateAttr(default=None)

    @field_validator("public_url", "endpoint_url", "bucket", "region_name", mode="before")
    @classmethod
    def _blank_is_absent(cls, value: Any) -> Any:
        # ModelsLab clients send "" for fields they leave out.
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @field_validator("aws_access_key_id", "aws_secret_access_key")
    @classmethod
    def _credentials_required(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # Blank keys must never let boto3 fall back to the service's own credentials.
        stripped = value.get_secret_value().strip()
        if not stripped:
            raise errors.InvalidInput(f"{info.field_name} is required", field=info.field_name)
        return SecretStr(stripped)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in {"http", "https"}:
            raise errors.InvalidInput("public_url must be an http(s) URL", field="public_url")
        return value.rstrip("/") if value else None

    @field_validator("image_directory")
    @classmethod
    def _normalise_directory(cls, value: str) -> str:
        segments = [s for s in value.strip().replace("\\", "/").split("/") if s]
        if any(s in {".", ".."} for s in segments):
            raise errors.InvalidInput(
                "image_directory must not contain '.' or '..'", field="image_directory"
            )
        return "/".join(segments)

    @model_validator(mode="after")
    def _resolve_bucket(self) -> S3Details:
        endpoint = _parse_endpoint(self.endpoint_url, self.bucket) if self.endpoint_url else None
        url_bucket = endpoint.bucket if endpoint else None
        if self.bucket and url_bucket and self.bucket != url_bucket:
            raise errors.InvalidInput(
                f"bucket '{self.bucket}' differs from '{url_bucket}' named in endpoint_url",
                field="bucket",
            )
        bucket = self.bucket or url_bucket
        if not bucket:
            raise errors.InvalidInput(
                "no bucket: give 'bucket', or an endpoint_url that names it "
                "(https://BUCKET.s3.REGION.amazonaws.com or https://host/BUCKET)",
                field="endpoint_url",
            )
        if not _BUCKET.fullmatch(bucket):
            raise errors.InvalidInput(f"'{bucket}' is not a valid bucket name", field="bucket")
        region = self.region_name or (endpoint.region if endpoint else None) or DEFAULT_REGION
        if not _REGION.fullmatch(region):
            raise errors.InvalidInput(f"'{region}' is not a valid region", field="region_name")
        self.bucket, self.region_name = bucket, region
        self._api_url = endpoint.api_url if endpoint else None
        return self

    @property
    def api_url(self) -> str | None:
        """The endpoint boto3 talks to: None for AWS's default, else scheme://host[:port]."""
        return self._api_url

    @property
    def bucket_name(self) -> str:
        """The resolved bucket (always set once validated)."""
        if self.bucket is None:  # only reachable via model_construct, which skips validation
            raise ValueError("S3Details was not validated")
        return self.bucket

    def masked(self) -> dict[str, str | None]:
        """What a user may see of their saved details: the secret never, the key id masked."""
        return {
            "deploy_type": self.deploy_type,
            "bucket": self.bucket,
            "region_name": self.region_name,
            "endpoint_url": self.endpoint_url,
            "public_url": self.public_url,
            "image_directory": self.image_directory,
            "aws_access_key_id": _mask(self.aws_access_key_id.get_secret_value()),
            "aws_secret_access_key": _HIDDEN,
        }

    def to_encrypted(self, box: SecretBox) -> str:
        """The whole record as one encrypted blob, for storage at rest."""
        data = self.model_dump(mode="json")
        data["aws_access_key_id"] = self.aws_access_key_id.get_secret_value()
        data["aws_secret_access_key"] = self.aws_secret_access_key.get_secret_value()
        return box.encrypt(json.dumps(data))

    @classmethod
    def from_encrypted(cls, box: SecretBox, blob: str) -> S3Details:
        """Read back a blob of to_encrypted; errors.StorageError if it cannot be decrypted."""
        return cls.model_validate_json(box.decrypt(blob))


@dataclass(frozen=True)
class UploadResult:
    url: str  # public_url + key, or a presigned GET URL
    key: str
    note: str | None = None  # something the user should know, e.g. ACLs were refused


class UserBucket:
    """A user's bucket reached with their own credentials."""

    def __init__(
        self, details: S3Details, *, allow_private: bool, client: S3Client | None = None
    ) -> None:
        self.details = details
        self.bucket = details.bucket_name
        self._client = client or make_s3_client(
            details.api_url,
            allow_private=allow_private,
            region_name=details.region_name,
            access_key_id=details.aws_access_key_id.get_secret_value(),
            secret_access_key=details.aws_secret_access_key.get_secret_value(),
        )

    def key_for(self, name: str) -> str:
        """The object key of an output: image_directory/name, never anything above it."""
        if not is_safe_name(name):
            raise ValueError(f"{name!r} is not a plain file name")
        directory = self.details.image_directory
        return f"{directory}/{name}" if directory else name

    def probe(self) -> None:
        """Write and delete a tiny object: proves bucket, credentials and endpoint all work."""
        key = self.key_for(f"magicmix-probe-{uuid.uuid4().hex}.txt")
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=b"magicmix probe", ContentType="text/plain"
            )
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as err:
            field, message = self._explain(err)
            log.info(
                "user bucket probe failed: %s", s3_error_code(err), extra={"bucket": self.bucket}
            )
            raise errors.InvalidInput(message, field=field) from err

    def upload(self, name: str, data: bytes) -> UploadResult:
        """Store a PNG under image_directory; the URL is public_url + key, else presigned."""
        key = self.key_for(name)
        public_url = self.details.public_url
        note = None
        try:
            if public_url:
                note = self._put_public(key, data)
            else:
                self._put(key, data)
        except (BotoCoreError, ClientError) as err:
            _, message = self._explain(err)
            raise errors.StorageError(f"upload to your bucket failed: {message}") from err
        log.info("uploaded to user bucket", extra={"bucket": self.bucket, "key": key})
        if public_url:
            return UploadResult(f"{public_url}/{quote(key)}", key, note)
        url = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS
        )
        return UploadResult(url, key, note)

    def delete(self, key: str) -> None:
        """Remove an object this service uploaded (a job that ended another way first)."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as err:
            code = s3_error_code(err)
            raise errors.StorageError(f"removing an object of your bucket failed ({code})") from err

    def _put(self, key: str, data: bytes, **extra: Any) -> None:
        self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=PNG, **extra)

    def _put_public(self, key: str, data: bytes) -> str | None:
        """Upload public-read as ModelsLab does; where ACLs are refused, upload without."""
        try:
            self._put(key, data, ACL="public-read")
        except ClientError as err:
            code = s3_error_code(err)
            if code not in _ACL_REFUSED_CODES:
                raise
            self._put(key, data)
            log.warning("user bucket refused the ACL (%s)", code, extra={"bucket": self.bucket})
            return (
                f"the bucket refused the public-read ACL ({code}), so the image was uploaded "
                "without it; public_url serves it only if the bucket policy allows public reads"
            )
        return None

    def _explain(self, err: Exception) -> tuple[str | None, str]:
        """The update_s3 field to blame and a message naming what failed (no secrets)."""
        code = s3_error_code(err)
        details = self.details
        if code == "NoSuchBucket":
            return "bucket", f"bucket '{self.bucket}' does not exist"
        if code in _ACCESS_CODES:
            return _ACCESS_CODES[code], (
                f"access denied to bucket '{self.bucket}' ({code}): check "
                "aws_access_key_id/aws_secret_access_key and that they may write under "
                f"'{details.image_directory}/'"
            )
        if code in _REGION_CODES:
            return "region_name", (
                f"bucket '{self.bucket}' is not in region '{details.region_name}' ({code}): "
                "check region_name"
            )
        if isinstance(err, BotoConnectionError | HTTPClientError):
            where = details.endpoint_url or f"AWS S3 in {details.region_name}"
            return "endpoint_url", f"cannot reach endpoint_url {where} ({code})"
        return None, f"S3 refused the request ({code}): check endpoint_url and bucket"


def check_s3_endpoint(details: S3Details, settings: Settings) -> None:
    """SSRF guard on the address boto3 will connect to (AWS's default endpoint is public).

    Run before the probe and before every upload, since DNS can change in between.
    """
    if details.api_url:
        check_url(details.api_url, allow_private=settings.allow_private_urls, field="endpoint_url")
