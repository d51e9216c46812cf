"""Logging for every process of the service: one format, and no secrets in any line.

User URLs carry secrets in their query strings (presigned S3 signatures, webhook
tokens). Our own code logs URLs through `netguard.redact_url`; the record factory installed here
is the net under every logger, libraries included (httpx logs each request's full URL at
INFO): it cuts credentials, query string and fragment out of every URL in every record.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# scheme://[user:pass@]host... up to whitespace; the query and fragment are dropped
_URL = re.compile(r"(?P<scheme>https?://)(?:[^\s/@]+@)?(?P<rest>[^\s?#]*)(?:[?#][^\s'\"]*)?")
_QUIET = ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer", "alembic")


def redact(text: str) -> str:
    """`text` with every URL's credentials, query string and fragment removed."""
    return _URL.sub(_strip, text)


def _strip(match: re.Match[str]) -> str:
    whole = match.group(0)
    kept = match.group("scheme") + match.group("rest")
    return kept + ("?…" if len(kept) < len(whole) and ("?" in whole or "#" in whole) else "")


def install_redaction() -> None:
    """Redact every log record as it is made, whoever logs it (idempotent)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it itself
            return record
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return record

    factory.redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def configure_logging(level: str) -> None:
    """The service's logging: our format at `level`, libraries at WARNING, URLs redacted."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    install_redaction()
