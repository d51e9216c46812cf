"""The SSRF guard: every forbidden form refused before any connection; the client re-checks.

Only loopback traffic: forbidden URLs are IP literals or names from /etc/hosts, so
`check_url` resolves them without DNS and refuses them without connecting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from http_fixtures import LoopbackServer, redirect, respond

from magicmix.errors import InvalidInput
from magicmix.inputs.netguard import RefusedAddress, check_url, guarded_async_client

LOOPBACK_AND_PRIVATE = [
    "http://localhost/",
    "http://127.0.0.1/",
    "http://127.0.0.2:8080/x",
    "http://127.1/",  # short dotted form
    "http://2130706433/",  # 127.0.0.1 as one decimal number
    "http://0x7f.0.0.1/",  # hexadecimal octet
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped IPv6
    "http://[::127.0.0.1]/",  # IPv4-compatible IPv6
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://172.31.255.254/",
    "http://192.168.1.1/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://100.64.0.1/",  # shared address space
    "http://[::ffff:10.0.0.1]/",
    "http://[64:ff9b::a00:1]/",  # NAT64 form of 10.0.0.1
    "http://[2002:7f00:1::]/",  # 6to4 form of 127.0.0.1
]
ALWAYS_FORBIDDEN = [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://169.254.1.1/",
    "http://[fe80::1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://0.1.2.3/",
    "http://192.0.2.10/",  # documentation range
    "http://[fec0::1]/",  # deprecated site-local
]


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as running:
        running.route("/ok", respond(200, b"hello"))
        running.route("/moved", redirect("/ok"))
        yield running


@pytest.mark.parametrize("url", LOOPBACK_AND_PRIVATE + ALWAYS_FORBIDDEN)
def test_forbidden_addresses_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput, match="refused") as caught:
        check_url(url, allow_private=False, field="image")
    assert caught.value.field == "image"


@pytest.mark.parametrize("url", LOOPBACK_AND_PRIVATE)
def test_allow_private_lets_loopback_and_private_through(url: str) -> None:
    check_url(url, allow_private=True, field="image")


@pytest.mark.parametrize("url", ALWAYS_FORBIDDEN)
def test_allow_private_still_refuses_metadata_and_special_addresses(url: str) -> None:
    with pytest.raises(InvalidInput, match="refused"):
        check_url(url, allow_private=True, field="image")


@pytest.mark.parametrize(
    "url",
    ["http://1.1.1.1/", "https://[2606:4700:4700::1111]:8443/a.png", "http://[::ffff:8.8.8.8]/"],
)
def test_public_addresses_pass(url: str) -> None:
    check_url(url, allow_private=False, field="image")


def test_message_names_the_field_and_the_address() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_url("http://127.1/a.png", allow_private=False, field="image")
    assert caught.value.message == (
        "image URL points to a private or loopback address (127.0.0.1); refused"
    )
    with pytest.raises(InvalidInput, match=r"webhook URL points to a link-local .*169\.254"):
        check_url("http://169.254.169.254/", allow_private=True, field="webhook")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://1.1.1.1/a.png", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("gopher://1.1.1.1/", "http or https"),
        ("javascript:alert(1)", "http or https"),
        ("1.1.1.1/a.png", "http or https"),
        ("http://user:secret@1.1.1.1/", "credentials"),
        ("http://user@localhost/", "credentials"),
        ("http:///a.png", "no host"),
        ("http://[::1/", "not a valid URL"),
    ],
)
def test_bad_url_shapes_are_refused(url: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        check_url(url, allow_private=True, field="image")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "2130706433", "[::ffff:127.0.0.1]"])
def test_guarded_client_refuses_at_connect_time(server: LoopbackServer, host: str) -> None:
    """No check_url here: the client itself must refuse, as it would after DNS rebinding."""

    async def get() -> None:
        async with guarded_async_client(allow_private=False, timeout_s=2) as client:
            await client.get(server.url("/ok", host=host))

    with pytest.raises(RefusedAddress, match="private or loopback"):
        asyncio.run(get())
    assert server.requests == []


def test_guarded_client_connects_when_allowed_and_never_follows_redirects(
    server: LoopbackServer,
) -> None:
    async def get(path: str) -> httpx.Response:
        async with guarded_async_client(allow_private=True, timeout_s=2) as client:
            return await client.get(server.url(path, host="localhost"))

    assert asyncio.run(get("/ok")).content == b"hello"
    moved = asyncio.run(get("/moved"))
    assert moved.status_code == 302
    assert [r.path for r in server.requests] == ["/ok", "/moved"]
