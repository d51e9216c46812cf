"""Create or update the service bucket: private, encrypted at rest, outputs expire after a day.

Idempotent: every step reads the bucket's current state first and prints 'unchanged' when
it already matches, so running it again (or on a bucket made by hand) is safe. Run it
with administrator credentials, not the service's own (those may not change buckets).
Standalone on purpose: it needs boto3 only, not the magicmix package.

    python infra/setup.py --bucket my-magicmix --prefix outputs/ [--region R] [--endpoint-url URL]
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.literals import BucketLocationConstraintType
    from mypy_boto3_s3.type_defs import (
        PublicAccessBlockConfigurationTypeDef,
        ServerSideEncryptionConfigurationTypeDef,
    )

HERE = Path(__file__).resolve().parent
PUBLIC_ACCESS_BLOCK: PublicAccessBlockConfigurationTypeDef = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": True,
}
SSE_S3: ServerSideEncryptionConfigurationTypeDef = {
    "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
}


def render(name: str, *, bucket: str, prefix: str) -> Any:
    """One of this folder's JSON files with ${BUCKET} and ${PREFIX} filled in."""
    text = string.Template((HERE / name).read_text()).substitute(BUCKET=bucket, PREFIX=prefix)
    return json.loads(text)


def error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def contains(actual: Any, wanted: Any) -> bool:
    """True when `actual` has everything `wanted` has; providers add defaults of their own."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(
            contains(actual.get(key), value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(contains(a, w) for a, w in zip(actual, wanted, strict=True))
        )
    return bool(actual == wanted)


def read_or_missing(call: Callable[[], Any], missing_code: str) -> Any:
    """The reply of a get_* call, or None where S3 answers that nothing is configured yet."""
    try:
        return call()
    except ClientError as err:
        if error_code(err) == missing_code:
            return None
        raise


def ensure_bucket(s3: S3Client, bucket: str, region: str) -> str:
    try:
        s3.head_bucket(Bucket=bucket)
        return "unchanged"
    except ClientError as err:
        if error_code(err) not in {"404", "NoSuchBucket", "NotFound"}:
            raise  # 403: the name is taken by another account, or these credentials are wrong
    if region == "us-east-1":  # the one region that refuses an explicit LocationConstraint
        s3.create_bucket(Bucket=bucket)
    else:
        s3.create_bucket(
            Bucket=bucket,
            CreateBucketConfiguration={
                "LocationConstraint": cast("BucketLocationConstraintType", region)
            },
        )
    return "created"


def ensure_public_access_block(s3: S3Client, bucket: str) -> str:
    reply = read_or_missing(
        lambda: s3.get_public_access_block(Bucket=bucket),
        "NoSuchPublicAccessBlockConfiguration",
    )
    if reply and contains(reply["PublicAccessBlockConfiguration"], PUBLIC_ACCESS_BLOCK):
        return "unchanged"
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=PUBLIC_ACCESS_BLOCK)
    return "applied"


def ensure_lifecycle(s3: S3Client, bucket: str, prefix: str) -> str:
    """Our rules, matched by ID; the bucket's other rules are kept as they are."""
    wanted = render("lifecycle.json", bucket=bucket, prefix=prefix)["Rules"]
    reply = read_or_missing(
        lambda: s3.get_bucket_lifecycle_configuration(Bucket=bucket),
        "NoSuchLifecycleConfiguration",
    )
    current = {rule.get("ID"): rule for rule in (reply or {}).get("Rules", [])}
    if all(contains(current.get(rule["ID"]), rule) for rule in wanted):
        return "unchanged"
    ours = {rule["ID"] for rule in wanted}
    others = [rule for rule_id, rule in current.items() if rule_id not in ours]
    s3.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": others + wanted}
    )
    return f"applied (kept {len(others)} other rules)" if others else "applied"


def ensure_encryption(s3: S3Client, bucket: str) -> str:
    reply = read_or_missing(
        lambda: s3.get_bucket_encryption(Bucket=bucket),
        "ServerSideEncryptionConfigurationNotFoundError",
    )
    rules = (reply or {}).get("ServerSideEncryptionConfiguration", {}).get("Rules", [])
    algorithms = {
        r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in rules
    }
    if algorithms & {"AES256", "aws:kms", "aws:kms:dsse"}:  # KMS is stronger: leave it be
        return "unchanged"
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration=SSE_S3)
    return "applied"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bucket", required=True, help="the service bucket")
    parser.add_argument(
        "--prefix", default="outputs/", help="where outputs go (MAGICMIX_STORE_URL)"
    )
    parser.add_argument("--region", help="bucket region (default: boto3's, else us-east-1)")
    parser.add_argument("--endpoint-url", help="an S3-compatible endpoint instead of AWS")
    args = parser.parse_args(argv)
    prefix = args.prefix.strip("/")
    if not prefix:
        parser.error("--prefix must name a folder: the lifecycle rule expires everything under it")
    prefix += "/"
    bucket: str = args.bucket
    region = args.region or boto3.session.Session().region_name or "us-east-1"
    # Most S3-compatible servers do not resolve bucket subdomains: path style for those.
    config = Config(s3={"addressing_style": "path"}) if args.endpoint_url else None
    s3 = boto3.client("s3", region_name=region, endpoint_url=args.endpoint_url, config=config)

    steps: list[tuple[str, Callable[[], str]]] = [
        (f"bucket {bucket}", lambda: ensure_bucket(s3, bucket, region)),
        ("public access block", lambda: ensure_public_access_block(s3, bucket)),
        (
            f"lifecycle: expire {prefix} after 1 day",
            lambda: ensure_lifecycle(s3, bucket, prefix),
        ),
        ("default encryption SSE-S3", lambda: ensure_encryption(s3, bucket)),
    ]
    changes = 0
    for label, step in steps:
        try:
            outcome = step()
        except (BotoCoreError, ClientError) as err:
            print(f"{label}: FAILED: {err}", file=sys.stderr)
            return 1
        print(f"{label}: {outcome}")
        changes += outcome != "unchanged"
    print(f"done: {changes} changes" if changes else "done: no changes")
    print(f"service store: MAGICMIX_STORE_URL=s3://{bucket}/{prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
