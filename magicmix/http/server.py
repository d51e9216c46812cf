"""uvicorn, set up for a service that faces the internet: a deadline on request headers.

uvicorn's h11 protocol times out idle keep-alive connections but not a client that sends
a request line and headers slowly, or nothing at all: each such connection would stay
open as long as the client likes (slowloris). `GuardedH11Protocol` gives every request's
headers `header_timeout_s` to arrive and closes the connection otherwise. Bodies have
their own deadline in `middleware.BodyGuard`, which also protects the app under Modal's
proxy (there, headers are the proxy's concern).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from magicmix.config import Settings


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()  # a new request begins: its headers are on the clock
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are in

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(
    app: Any, *, host: str, port: int, settings: Settings, **extra: Any
) -> uvicorn.Config:
    """The uvicorn config `magicmix serve` (and the tests) run the app with."""
    protocol = type(
        "HeaderTimeoutH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": settings.header_timeout_s},
    )
    options: dict[str, Any] = {"log_level": settings.log_level.lower(), "access_log": False}
    return uvicorn.Config(app, host=host, port=port, http=protocol, **{**options, **extra})
