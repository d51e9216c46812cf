"""SSRF through the HTTP API: every forbidden target is refused before any connection.

`tests/test_netguard.py` proves the guard function on its own; this proves the API path
uses it, for the layout image (`image`), the webhook (`webhook`) and the S3 probe
(`update_s3.endpoint_url`), on a server run with MAGICMIX_ALLOW_PRIVATE_URLS=false.

Nothing here may leave 127.0.0.0/8. `loopback_only()` patches the process's resolver and
`socket.connect` while a test runs: names resolve only from a fake table (or as IP
literals, which need no DNS), every connection attempt is recorded, and any attempt
outside loopback is refused and fails the test. A fake *public* address is rewritten to a
loopback listener, which is how an "allowed" public host can be served here at all. The
tests then check two things for each forbidden URL: a 422 naming the field and the reason,
and no connection attempt to the target (nor any request on the listener behind it).
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_layout_image
from tests.http_fixtures import LoopbackServer, redirect, respond
from tests.service_fixtures import API, RunningService, png, serve, service_settings

FAKE_PUBLIC_IP = "93.184.215.14"  # a global address; connections to it are rewritten to loopback
PUBLIC_NAME = "images.public.test"  # resolves to FAKE_PUBLIC_IP (fake DNS)
LOOPBACK_NAME = "loopback.public.test"  # a hostname whose DNS answer is 127.0.0.1
METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


@dataclass
class NetworkLog:
    """What the patched socket layer saw: every (ip, port) connect attempt, and refusals."""

    connects: list[tuple[str, int]] = field(default_factory=list)
    blocked: list[tuple[str, int]] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)

    def attempts_to(self, port: int) -> list[tuple[str, int]]:
        return [c for c in self.connects if c[1] == port]


def _is_literal(host: str) -> bool:
    """An IP literal in any form libc parses without DNS (127.1, 2130706433, ::1...)."""
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host.split("%")[0])
        return True
    except OSError:
        return False


@contextmanager
def loopback_only(
    fake_dns: Mapping[str, str | Callable[[], str]] | None = None,
    rewrite: Mapping[str, int] | None = None,
) -> Iterator[NetworkLog]:
    """Process-wide: no DNS, no connection outside 127.0.0.0/8 (or ::1) while active.

    `fake_dns` maps names to an address (or a function giving one, for rebinding tests);
    `rewrite` maps an address to the loopback port that connections to it really reach.
    """
    table: dict[str, str | Callable[[], str]] = {"localhost": "127.0.0.1", **(fake_dns or {})}
    targets = dict(rewrite or {})
    log = NetworkLog()
    lock = threading.Lock()
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host) if host else ""
        with lock:
            log.lookups.append(name)
        if name.lower() in table:
            answer = table[name.lower()]
            address = answer() if callable(answer) else answer
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (
                (address, int(port or 0), 0, 0) if ":" in address else (address, int(port or 0))
            )
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]
        if not name or _is_literal(name.strip("[]")):
            return real_getaddrinfo(host, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, f"{name}: no DNS in tests (loopback_only)")

    def checked(address: Any) -> Any:
        if not isinstance(address, tuple):  # AF_UNIX paths
            return address
        ip, port = str(address[0]), int(address[1])
        with lock:
            log.connects.append((ip, port))
        if ip in targets:
            return ("127.0.0.1", targets[ip])
        if not ipaddress.ip_address(ip.split("%")[0]).is_loopback:
            with lock:
                log.blocked.append((ip, port))
            raise ConnectionRefusedError(f"loopback_only: connection to {ip}:{port} blocked")
        return address

    def connect(self: socket.socket, address: Any) -> None:
        real_connect(self, checked(address))

    def connect_ex(self: socket.socket, address: Any) -> int:
        return real_connect_ex(self, checked(address))

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    try:
        yield log
    finally:
        socket.getaddrinfo = real_getaddrinfo
        socket.socket.connect = real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = real_connect_ex  # type: ignore[method-assign]
    assert not log.blocked, f"connections outside loopback were attempted: {log.blocked}"


LAYOUT_B64 = base64.b64encode(png(make_layout_image(64, 64))).decode()


@pytest.fixture(scope="module")
def target() -> Iterator[LoopbackServer]:
    """The listener every forbidden URL points at: it must never see a connection."""
    with LoopbackServer() as server:
        server.route(
            "/layout.png", respond(200, png(make_layout_image()), {"Content-Type": "image/png"})
        )
        server.route("/hook", respond(200, b"ok"))
        yield server


@pytest.fixture(scope="module")
def strict(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningService]:
    """A server as deployed: private URLs not allowed."""
    settings = service_settings(
        tmp_path_factory.mktemp("ssrf"), tiny_model_dir, allow_private_urls=False, sync_wait_s=60
    )
    with serve(settings) as running:
        yield running


def forbidden_urls(port: int) -> list[str]:
    """Loopback in its many spellings, private and link-local ranges, metadata, a DNS name."""
    return [
        f"http://localhost:{port}/layout.png",
        f"http://127.0.0.1:{port}/layout.png",
        f"http://127.1:{port}/layout.png",
        f"http://2130706433:{port}/layout.png",
        f"http://0x7f000001:{port}/layout.png",
        f"http://[::1]:{port}/layout.png",
        f"http://[::ffff:127.0.0.1]:{port}/layout.png",
        f"http://{LOOPBACK_NAME}:{port}/layout.png",
        f"https://127.0.0.1:{port}/layout.png",
        "http://10.0.0.1/layout.png",
        "http://172.16.5.4/layout.png",
        "http://192.168.0.1/layout.png",
        "http://100.64.0.1/layout.png",
        "http://[fd00::1]/layout.png",
        "http://169.254.1.1/layout.png",
        "http://[fe80::1]/layout.png",
        METADATA,
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://0.0.0.0/",
    ]


NON_HTTP = [
    "file:///etc/passwd",
    "ftp://127.0.0.1/layout.png",
    "gopher://127.0.0.1:6379/_INFO",
    "dict://127.0.0.1:11211/stat",
    "ldap://127.0.0.1/",
    "javascript:alert(1)",
    "http://user:pw@127.0.0.1/layout.png",
]
REASON = ("private or loopback", "link-local", "unspecified", "http or https", "credentials")


def assert_refused(reply: Any, field_name: str) -> str:
    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert body["status"] == "error" and field_name in body["errors"], body
    assert "Traceback" not in reply.text
    return str(body["errors"][field_name])


def test_forbidden_image_urls_are_refused_before_any_connection(
    strict: RunningService, target: LoopbackServer
) -> None:
    urls = forbidden_urls(target.port) + NON_HTTP
    with loopback_only({LOOPBACK_NAME: "127.0.0.1"}) as net:
        for url in urls:
            why = assert_refused(strict.mix(image=url), "image")
            assert any(reason in why for reason in REASON), (url, why)
    assert not net.attempts_to(target.port) and not target.requests
    assert not net.connects or all(port == _port(strict) for _, port in net.connects)


def test_forbidden_webhooks_are_refused_before_any_job_or_connection(
    strict: RunningService, target: LoopbackServer
) -> None:
    before = strict.service.jobs.queue_length()
    with loopback_only({LOOPBACK_NAME: "127.0.0.1"}) as net:
        for url in [u.replace("/layout.png", "/hook") for u in forbidden_urls(target.port)]:
            why = assert_refused(strict.mix(image=LAYOUT_B64, webhook=url), "webhook")
            assert any(reason in why for reason in REASON), (url, why)
        for url in NON_HTTP:
            assert_refused(strict.mix(image=LAYOUT_B64, webhook=url), "webhook")
    assert not net.attempts_to(target.port) and not target.requests
    assert strict.service.jobs.queue_length() == before


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://169.254.169.254/bucket",
        "http://10.0.0.5:9000/bucket",
        "http://localhost:9000/bucket",
    ],
)
def test_forbidden_s3_endpoints_are_refused_before_the_probe(
    strict: RunningService, endpoint: str
) -> None:
    body = {
        "key": strict.key,
        "deploy_type": "image_editing",
        "endpoint_url": endpoint,
        "aws_access_key_id": "AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key": "not-a-real-secret-0123456789",
    }
    with loopback_only() as net:
        assert_refused(strict.post(f"{API}/update_s3", body), "endpoint_url")
    assert not [c for c in net.connects if c[1] != _port(strict)]


@pytest.mark.parametrize(
    "forbidden",
    [
        "http://127.0.0.1:{port}/layout.png",
        "http://[::1]:{port}/layout.png",
        "http://" + LOOPBACK_NAME + ":{port}/layout.png",
        METADATA,
        "file:///etc/passwd",
    ],
)
def test_redirect_from_an_allowed_host_to_a_forbidden_one_is_not_followed(
    strict: RunningService, target: LoopbackServer, forbidden: str
) -> None:
    with LoopbackServer() as public:
        public.route("/moved", redirect(forbidden.format(port=target.port)))
        url = f"http://{PUBLIC_NAME}:{public.port}/moved"
        dns = {PUBLIC_NAME: FAKE_PUBLIC_IP, LOOPBACK_NAME: "127.0.0.1"}
        with loopback_only(dns, rewrite={FAKE_PUBLIC_IP: public.port}) as net:
            why = assert_refused(strict.mix(image=url), "image")
        assert [r.path for r in public.requests] == ["/moved"]  # the allowed hop was taken
    assert any(reason in why for reason in REASON), why
    assert not net.attempts_to(target.port) and not target.requests


def test_allowed_public_host_is_fetched_and_mixed(strict: RunningService) -> None:
    """The control: the same harness lets a public address through, so refusals mean something."""
    with LoopbackServer() as public:
        public.route(
            "/layout.png", respond(200, png(make_layout_image()), {"Content-Type": "image/png"})
        )
        with loopback_only(
            {PUBLIC_NAME: FAKE_PUBLIC_IP}, rewrite={FAKE_PUBLIC_IP: public.port}
        ) as net:
            reply = strict.mix(
                image=f"http://{PUBLIC_NAME}:{public.port}/layout.png", steps=4, seed=1
            )
        assert reply.status_code == 200 and reply.json()["status"] == "success", reply.text
        assert (FAKE_PUBLIC_IP, public.port) in net.connects


def test_dns_rebinding_between_check_and_connect_is_refused(
    strict: RunningService, target: LoopbackServer
) -> None:
    """The name is public when checked and loopback when connected: the connect-time guard wins."""
    answers = iter([FAKE_PUBLIC_IP])
    rebind = "rebind.public.test"

    def resolve() -> str:
        return next(answers, "127.0.0.1")

    with loopback_only({rebind: resolve}, rewrite={FAKE_PUBLIC_IP: target.port}) as net:
        why = assert_refused(strict.mix(image=f"http://{rebind}:{target.port}/layout.png"), "image")
    assert "loopback" in why and net.lookups.count(rebind) >= 2
    assert not net.attempts_to(target.port) and not target.requests


def _port(app: RunningService) -> int:
    return int(app.base_url.rsplit(":", 1)[1])
