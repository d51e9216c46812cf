"""The web function's front door on 127.0.0.1:PORT, where Modal's edge would be.

Each request goes to a web container with a free input slot (`@modal.concurrent`'s
`max_inputs`; one at a time without it), started on demand up to `max_containers`. A
request not answered within 150 s gets what Modal answers
(https://modal.com/docs/guide/webhook-timeouts): a 303 to "the original URL with a
special query parameter linking it [to] that request", a result URL that "can be
reloaded without triggering a new request" and "will block until the request
completes" (again for at most 150 s). The parameter's name is not documented; here it
is `__rehearsal_result`. Responses are buffered whole (no streaming), and websockets
are not emulated.

`GET /__rehearsal__/counters` answers the control plane's counters as JSON.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

import httpx

from rehearsal.control import ControlPlane
from rehearsal.state import Service

RESULT_PARAM = "__rehearsal_result"
COUNTERS_PATH = "/__rehearsal__/counters"
KEEP_RESULT_S = 600.0  # how long a result URL stays reloadable after its request ended
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"upgrade",
        b"proxy-connection",
        b"te",
        b"trailer",
    }
)

Reply = tuple[int, list[tuple[bytes, bytes]], bytes]


class FrontDoor:
    """An ASGI app in the rehearsal's main process, forwarding to web containers."""

    def __init__(self, plane: ControlPlane, service: Service, request_limit_s: float) -> None:
        self.plane = plane
        self.service = service
        self.limit_s = request_limit_s
        self.pending: dict[str, asyncio.Task[Reply]] = {}
        self.slots = ThreadPoolExecutor(64, thread_name_prefix="rehearsal-web-slot")
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        if scope["path"] == COUNTERS_PATH:
            body = json.dumps(self.plane.op_counters(), sort_keys=True).encode()
            await _send(send, (200, [(b"content-type", b"application/json")], body))
            return
        query = parse_qs(scope["query_string"].decode("latin-1"))
        if RESULT_PARAM in query:
            call_id = query[RESULT_PARAM][0]
            task = self.pending.get(call_id)
            if task is None:
                await _send(send, (404, [], b"unknown or expired result URL"))
                return
        else:
            body = await _read_body(receive)
            call_id = f"fc-{secrets.token_hex(12)}"
            task = asyncio.create_task(self._forward(scope, body))
        await self._answer(scope, send, call_id, task)

    async def _answer(
        self, scope: dict[str, Any], send: Any, call_id: str, task: asyncio.Task[Reply]
    ) -> None:
        done, _ = await asyncio.wait({task}, timeout=self.limit_s)
        if not done:
            if call_id not in self.pending:
                self.pending[call_id] = task
                loop = asyncio.get_running_loop()
                task.add_done_callback(
                    lambda _: loop.call_later(KEEP_RESULT_S, self.pending.pop, call_id, None)
                )
            self.plane.count("web.redirects_303")
            location = f"{scope['path']}?{RESULT_PARAM}={call_id}".encode()
            await _send(send, (303, [(b"location", location)], b""))
            return
        try:
            reply = task.result()
        except httpx.HTTPError as err:  # the web container died under the request
            reply = (502, [], f"the web container failed: {err!r}".encode())
        await _send(send, reply)

    async def _forward(self, scope: dict[str, Any], body: bytes) -> Reply:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=None)
        loop = asyncio.get_running_loop()
        container = await loop.run_in_executor(self.slots, self.plane.acquire_web, self.service)
        try:
            query = scope["query_string"].decode("latin-1")
            url = f"http://127.0.0.1:{container.port}{scope['path']}" + (
                f"?{query}" if query else ""
            )
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
            request = self.client.build_request(scope["method"], url, headers=headers, content=body)
            response = await self.client.send(request, stream=True)
            try:
                content = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        finally:
            self.plane.release_web(container)
        kept = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
        return response.status_code, kept, content


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send: Any, reply: Reply) -> None:
    status, headers, body = reply
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
