"""An S3-protocol store on loopback, for `make rehearse`, the tests and the benchmarks.

moto's server (a test extra) in a thread of this process, on a free port of 127.0.0.1,
with credentials it accepts and nothing else would: AWS's documentation examples, no
profile files, no instance metadata. Nothing leaves loopback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
NEEDS_MOTO = "an S3-protocol server needs moto, from the test extras: pip install -e '.[test]'"


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port while the block runs; its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        raise SystemExit(NEEDS_MOTO) from err
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)  # a line per request would swamp everything else
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug.setLevel(level)


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client of the loopback server, with the dummy credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=DUMMY_KEY_ID,
        aws_secret_access_key=DUMMY_SECRET,
    )
