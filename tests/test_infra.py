"""infra/: setup.py against the loopback S3 server, twice; the JSON documents are well formed."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.s3_server import DUMMY_AWS_ENV

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import LifecycleRuleTypeDef

INFRA = Path(__file__).resolve().parents[1] / "infra"


def run_setup(endpoint_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    # No proxy, no profile files: the script must only ever talk to the loopback server.
    env = {"PATH": os.environ.get("PATH", ""), "NO_PROXY": "*", **DUMMY_AWS_ENV}
    return subprocess.run(
        [sys.executable, str(INFRA / "setup.py"), "--endpoint-url", endpoint_url, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_setup_creates_then_reports_unchanged(s3_server: str, s3_client: S3Client) -> None:
    bucket = f"magicmix-service-{uuid.uuid4().hex[:12]}"
    first = run_setup(s3_server, "--bucket", bucket, "--prefix", "/outputs")
    assert first.returncode == 0, first.stderr
    assert f"bucket {bucket}: created" in first.stdout
    assert "done: 4 changes" in first.stdout

    rules = s3_client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert [(r["ID"], r["Filter"], r["Expiration"]["Days"]) for r in rules] == [
        ("magicmix-expire-outputs", {"Prefix": "outputs/"}, 1)
    ]
    block = s3_client.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    encryption = s3_client.get_bucket_encryption(Bucket=bucket)
    default = encryption["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert default["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"

    second = run_setup(
        s3_server, "--bucket", bucket, "--prefix", "outputs/", "--region", "us-east-1"
    )
    assert second.returncode == 0, second.stderr
    steps = second.stdout.splitlines()[:4]
    assert all(line.endswith(": unchanged") for line in steps), second.stdout
    assert "done: no changes" in second.stdout


def test_setup_keeps_the_buckets_other_lifecycle_rules(
    s3_server: str, s3_client: S3Client, bucket: str
) -> None:
    other: LifecycleRuleTypeDef = {
        "ID": "keep-me",
        "Status": "Enabled",
        "Filter": {"Prefix": "logs/"},
        "Expiration": {"Days": 30},
    }
    s3_client.put_bucket_lifecycle_configuration(
        Bucket=bucket,
        LifecycleConfiguration={"Rules": [other]},
    )
    result = run_setup(s3_server, "--bucket", bucket)
    assert result.returncode == 0, result.stderr
    assert "applied (kept 1 other rules)" in result.stdout
    rules = s3_client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert {r["ID"] for r in rules} == {"keep-me", "magicmix-expire-outputs"}


def test_setup_refuses_an_empty_prefix(s3_server: str) -> None:
    result = run_setup(s3_server, "--bucket", "whatever-bucket", "--prefix", "/")
    assert result.returncode == 2
    assert "--prefix must name a folder" in result.stderr


@pytest.mark.parametrize(
    "name", ["lifecycle.json", "iam-service-policy.json", "iam-user-bucket-policy.json"]
)
def test_documents_render_to_json(name: str) -> None:
    text = (INFRA / name).read_text()
    rendered = string.Template(text).substitute(BUCKET="b", PREFIX="p/")
    assert "${" not in rendered
    json.loads(rendered)


def test_user_policy_grants_only_what_the_service_needs() -> None:
    policy = json.loads((INFRA / "iam-user-bucket-policy.json").read_text())
    (statement,) = policy["Statement"]
    assert sorted(statement["Action"]) == [
        "s3:DeleteObject",
        "s3:GetObject",
        "s3:PutObject",
        "s3:PutObjectAcl",
    ]
    assert statement["Resource"] == "arn:aws:s3:::${BUCKET}/${PREFIX}*"
