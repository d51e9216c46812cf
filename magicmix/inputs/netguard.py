"""SSRF guard: every outbound connection (layout images, webhooks, S3) goes through here.

Two layers, because a check alone is not enough:

1. `check_url` validates a URL before any request: http(s) only, no credentials, and every
   address its host resolves to must be allowed. This gives the client a clear error early.
2. The guarded clients (`guarded_async_client`, `guarded_client`) resolve and check again
   when a connection is opened, and then connect to the very address they checked: the
   one resolve-check-connect path. A name that resolved to a public address for
   `check_url` and to 127.0.0.1 a moment later (DNS rebinding) is still refused. boto3
   sends through `guarded_client` too (`outputs.s3`), so S3 endpoints get the same check.

`allow_private=True` (MAGICMIX_ALLOW_PRIVATE_URLS, dev and tests) lets loopback and
private-network addresses through; cloud metadata endpoints (link-local, and the few that
live in private ranges: Alibaba's 100.100.100.200, AWS's fd00:ec2::254, Azure's
168.63.129.16), multicast, unspecified and reserved addresses stay refused whatever the
setting.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import anyio
import httpcore
import httpx

from magicmix.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",  # shared address space (carrier-grade NAT, also VPN overlays)
        "fc00::/7",  # unique local addresses
    )
)
# Metadata and host-agent endpoints inside ranges that `allow_private` opens: never allowed.
_METADATA = tuple(
    ipaddress.ip_address(address)
    for address in (
        "100.100.100.200",  # Alibaba Cloud metadata (in the shared 100.64.0.0/10 range)
        "fd00:ec2::254",  # AWS instance metadata over IPv6 (a unique local address)
        "168.63.129.16",  # Azure's host agent (WireServer)
        "192.0.0.192",  # Oracle Cloud metadata
    )
)
# IPv6 forms that carry an IPv4 address inside; judged by the address they carry.
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RefusedAddress(InvalidInput):
    """A connection was about to open to a forbidden address; raised by the guarded client."""


def check_url(url: str, *, allow_private: bool, field: str) -> None:
    """Refuse `url` unless it is http(s), without credentials, and resolves to allowed addresses.

    Blocking (it resolves the host): call it through `asyncio.to_thread` from async code.
    """
    host, port = _split_url(url, field=field)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise InvalidInput(f"{field} URL host '{host}' could not be resolved", field=field) from err
    refusal = _first_refusal(_addresses(infos), allow_private=allow_private)
    if refusal is not None:
        raise InvalidInput(f"{field} URL points to {refusal}; refused", field=field)


def _addresses(infos: Iterable[tuple[Any, ...]]) -> list[str]:
    """The distinct addresses of `getaddrinfo` results, in order."""
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _allowed_addresses(
    host: str, infos: Iterable[tuple[Any, ...]], *, allow_private: bool
) -> list[str]:
    """The addresses to connect to, or `RefusedAddress` if any of them is forbidden."""
    addresses = _addresses(infos)
    refusal = _first_refusal(addresses, allow_private=allow_private)
    if refusal is not None:
        raise RefusedAddress(f"URL host {host} resolves to {refusal}; refused")
    if not addresses:
        raise httpcore.ConnectError(f"no address found for host {host}")
    return addresses


def _first_refusal(addresses: Iterable[str], *, allow_private: bool) -> str | None:
    """Why the first forbidden address of `addresses` is forbidden ("a ... address (ip)")."""
    for address in addresses:
        ip = ipaddress.ip_address(address)
        kind = _forbidden_kind(ip, allow_private=allow_private)
        if kind is not None:
            return f"{kind} address ({ip})"
    return None


def guarded_async_client(*, allow_private: bool, timeout_s: float) -> httpx.AsyncClient:
    """An httpx client that only connects to checked addresses and never follows redirects.

    Callers follow redirects themselves, with `check_url` on every hop. Environment proxies
    and .netrc are ignored (`trust_env=False`): a proxy would make the address check moot.
    Bodies are asked for uncompressed (`identity`): callers read them raw and bounded
    (`inputs.fetch`), never through httpx's whole-chunk decoders.
    """
    transport = httpx.AsyncHTTPTransport()
    transport._pool = httpcore.AsyncConnectionPool(  # see `_pool_note`
        ssl_context=httpx.create_ssl_context(),
        network_backend=_GuardedAsyncBackend(allow_private=allow_private),
    )
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeout_s,
        follow_redirects=False,
        trust_env=False,
        headers={"Accept-Encoding": "identity"},
    )


def guarded_client(
    *, allow_private: bool, timeout: httpx.Timeout, max_connections: int = 10
) -> httpx.Client:
    """The blocking twin of `guarded_async_client` (boto3 sends through it)."""
    transport = httpx.HTTPTransport()
    transport._pool = httpcore.ConnectionPool(  # see `_pool_note`
        ssl_context=httpx.create_ssl_context(),
        network_backend=_GuardedSyncBackend(allow_private=allow_private),
        max_connections=max_connections,
    )
    return httpx.Client(
        transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
    )


def redact_url(url: str) -> str:
    """`url` fit for a log line: scheme, host, port and path; no credentials, query or fragment.

    Presigned URLs and webhook tokens travel in query strings; they never reach a log.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid URL>"
    port = f":{parsed.port}" if parsed.port else ""
    hidden = "?…" if parsed.query or parsed.fragment else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}{hidden}"


def describe_transport_error(err: httpx.HTTPError) -> str:
    """A short, client-safe description of a failed exchange (no tracebacks, no internals)."""
    if isinstance(err, httpx.TimeoutException):
        return "the server did not answer in time"
    if isinstance(err, httpx.ConnectError):
        return f"could not connect ({err})" if str(err) else "could not connect"
    if isinstance(err, httpx.RemoteProtocolError):
        return "the server sent an invalid HTTP answer"
    return "the connection failed"


def _split_url(url: str, *, field: str) -> tuple[str, int]:
    """Host (ASCII, as it will be resolved) and port of an acceptable URL; httpx's own parser."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as err:
        raise InvalidInput(f"{field} URL is not a valid URL: {err}", field=field) from err
    if parsed.scheme not in ("http", "https"):
        shown = f"'{parsed.scheme}'" if parsed.scheme else "none"
        raise InvalidInput(
            f"{field} URL must use http or https (scheme: {shown}); refused", field=field
        )
    if parsed.userinfo:
        raise InvalidInput(
            f"{field} URL must not carry credentials (user:password@); refused", field=field
        )
    if not parsed.raw_host:
        raise InvalidInput(f"{field} URL has no host", field=field)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.raw_host.decode("ascii"), port


def _forbidden_kind(ip: IPAddress, *, allow_private: bool) -> str | None:
    """The kind of address `ip` is when it may not be contacted, else None."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return _forbidden_kind(embedded, allow_private=allow_private)
    if ip.is_unspecified:
        return "an unspecified"
    if ip.is_link_local:
        return "a link-local (cloud metadata)"
    if ip in _METADATA:
        return "a cloud metadata"
    if ip.is_multicast:
        return "a multicast"
    if ip.is_loopback or any(ip in net for net in _PRIVATE_NETWORKS):
        return None if allow_private else "a private or loopback"
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    if ip.is_reserved or site_local or not ip.is_global:
        return "a reserved or non-public"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside a mapped, compatible, 6to4 or NAT64 IPv6 address."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # `::` and `::1` are not
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


_pool_note = """httpx has no public parameter for httpcore's network backend, so the
guarded clients swap their transport's private `_pool` for an httpcore connection pool
(public API) built with httpx's default TLS settings and the guarded backend. httpcore
passes the URL's hostname to `start_tls` apart from the address, so certificates are
still verified against the name in the URL, not the IP connected to."""


class _GuardedAsyncBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks every address, then connects to a checked IP."""

    def __init__(self, *, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError as err:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from err
        except (socket.gaierror, UnicodeError) as err:
            raise httpcore.ConnectError(f"cannot resolve host {host}") from err
        last_error: Exception = httpcore.ConnectError(f"no address found for host {host}")
        for address in _allowed_addresses(host, infos, allow_private=self._allow_private):
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                last_error = err
        raise last_error

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedSyncBackend(httpcore.NetworkBackend):
    """The blocking twin of `_GuardedAsyncBackend`."""

    def __init__(self, *, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise httpcore.ConnectError(f"cannot resolve host {host}") from err
        last_error: Exception = httpcore.ConnectError(f"no address found for host {host}")
        for address in _allowed_addresses(host, infos, allow_private=self._allow_private):
            try:
                return self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                last_error = err
        raise last_error

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)
