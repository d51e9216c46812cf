"""The small error tree of magicmix.

Lower layers raise these and know nothing of transports: the HTTP layer maps each class to
a status code and the vendor's error body (`http.errors.STATUS`), the CLI to a one-line
message and an exit code (`cli.options.failure`), each in one place.
"""

from __future__ import annotations


class MagicMixError(Exception):
    """Base of every error we raise on purpose; `message` is safe to show to a client."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(MagicMixError):
    """The request is wrong; `field` names the offending field when there is one."""


class PayloadTooLarge(InvalidInput):
    """An input is over a size limit (bytes or pixels)."""


class Unauthorized(MagicMixError):
    """Missing or unknown API key."""


class Forbidden(MagicMixError):
    """A valid key asked for something it may not do (e.g. admin routes)."""


class NotFound(MagicMixError):
    """Unknown job id, or a job of another key (we do not say which)."""


class Conflict(MagicMixError):
    """The same request is still being handled (an Idempotency-Key in use)."""


class Gone(MagicMixError):
    """The thing existed but is no more: an expired job's outputs."""


class Busy(MagicMixError):
    """Over capacity; clients should retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotSupported(MagicMixError):
    """A request this service understands but does not do (e.g. updating itself)."""


class StorageError(MagicMixError):
    """An output store or a user's bucket refused or failed."""
