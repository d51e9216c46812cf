"""`modal.exception` under the rehearsal: the classes the emulated runtime raises.

Names and bases as in modal 1.6.4's `modal/exception.py`. Note that Modal's own
`TimeoutError` is not the built-in one: `FunctionCall.get(timeout=...)` raises the
built-in `TimeoutError` while the call runs (`_functions.py`, `poll_function`), and a
function that ran out of its `timeout` raises `FunctionTimeoutError` (a Modal
`TimeoutError`) once its retries are spent (https://modal.com/docs/guide/timeouts).
"""

from __future__ import annotations


class Error(Exception):
    """Base class for Modal errors."""


class RemoteError(Error):
    """Raised when an error occurs on the Modal server (here: a terminated input's `get`)."""


class InvalidError(Error):
    """Raised when user does something invalid."""


class NotFoundError(Error):
    """Raised when a requested resource was not found."""


class ExecutionError(Error):
    """Raised when something unexpected happened during runtime."""


class DeserializationError(Error):
    """Raised when a remote value cannot be unpickled here."""


class TimeoutError(Error):
    """Base class for Modal timeouts."""


class FunctionTimeoutError(TimeoutError):
    """Raised when a Function exceeds its execution duration limit and times out."""


class OutputExpiredError(TimeoutError):
    """Raised when the Output exceeds expiration and times out."""


class InputCancellation(BaseException):
    """Raised in user code when its input is cancelled.

    A BaseException, as in Modal, so `except Exception` in user code does not swallow it.
    """
