"""The small error tree of magicmix.

Lower layers raise these; only the HTTP server (and the CLI) turn them into status codes
and the vendor's error body, in one place each.
"""

from __future__ import annotations


class MagicMixError(Exception):
    """Base of every error we raise on purpose; `message` is safe to show to a client."""

    status_code = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(MagicMixError):
    """The request is wrong; `field` names the offending field when there is one."""

    status_code = 422


class PayloadTooLarge(InvalidInput):
    """An input is over a size limit (bytes or pixels)."""

    status_code = 413


class Unauthorized(MagicMixError):
    """Missing or unknown API key."""

    status_code = 401


class Forbidden(MagicMixError):
    """A valid key asked for something it may not do (e.g. admin routes)."""

    status_code = 403


class NotFound(MagicMixError):
    """Unknown job id, or a job of another key (we do not say which)."""

    status_code = 404


class Conflict(MagicMixError):
    """The same request is still being handled (an Idempotency-Key in use)."""

    status_code = 409


class Gone(MagicMixError):
    """The thing existed but is no more: an expired job's outputs."""

    status_code = 410


class Busy(MagicMixError):
    """Over capacity; clients should retry after `retry_after` seconds."""

    status_code = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageError(MagicMixError):
    """An output store or a user's bucket refused or failed."""

    status_code = 502
