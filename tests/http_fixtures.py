"""A real HTTP server on 127.0.0.1 for tests of the network edge: real sockets, no mocks.

Use it as a context manager (`with LoopbackServer() as server:`), register handlers with
`server.route(path, handler)`, and read what arrived in `server.requests`. `server.watch(path)`,
called before the requests, gives events to wait on instead of the clock: a request reached
the handler, or the handler ran to its end without the client hanging up.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from magicmix.store.testing import free_port as free_port  # the one definition, re-exported

Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclass(frozen=True)
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Watch:
    """What a test can wait on for one path, so no assertion rests on a time budget."""

    entered: threading.Event = field(default_factory=threading.Event)
    completed: threading.Event = field(default_factory=threading.Event)


def respond(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    """A handler that answers `status` with `body` and a Content-Length."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return handle


def redirect(location: str, status: int = 302) -> Handler:
    """A handler that redirects to `location`."""
    return respond(status, headers={"Location": location})


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the stdlib's 5 refuses a burst of concurrent webhook attempts


class LoopbackServer:
    """A threaded HTTP/1.0 server on 127.0.0.1 with per-path handlers; unknown paths are 404."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._routes: dict[str, Handler] = {}
        self._watches: dict[str, Watch] = {}
        self._httpd = _Server(("127.0.0.1", 0), _make_handler_class(self))
        self._httpd.daemon_threads = True  # a handler still dripping bytes must not block exit
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, path: str, handler: Handler) -> None:
        self._routes[path] = handler

    def watch(self, path: str) -> Watch:
        """Fresh events for the requests to `path` from now on (servers are reused across tests)."""
        self._watches[path] = Watch()
        return self._watches[path]

    def dispatch(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        self.requests.append(
            Recorded(request.command, request.path, dict(request.headers.items()), body)
        )
        path = request.path.split("?")[0]
        handler = self._routes.get(path, respond(404, b"not found"))
        watch = self._watches.get(path, Watch())
        watch.entered.set()
        # the client may hang up on purpose (size or time limit): that is what is tested
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            handler(request)
            watch.completed.set()

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _make_handler_class(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.dispatch(self)

        def do_POST(self) -> None:
            server.dispatch(self)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: pytest output is for failures."""

    return _Handler
