"""SSRF guard: user-given URLs (layout images, webhooks) may only reach public addresses.

Two layers, because a check alone is not enough:

1. `check_url` validates a URL before any request: http(s) only, no credentials, and every
   address its host resolves to must be public. This gives the client a clear error early.
2. `guarded_async_client` resolves and checks again when a connection is opened, and then
   connects to the very address it checked. A name that resolved to a public address for
   `check_url` and to 127.0.0.1 a moment later (DNS rebinding) is still refused.

`allow_private=True` (MAGICMIX_ALLOW_PRIVATE_URLS, dev and tests) lets loopback and
private-network addresses through; link-local (cloud metadata), multicast, unspecified and
reserved addresses stay refused whatever the setting.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

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
    refusal = _first_refusal((str(info[4][0]) for info in infos), allow_private=allow_private)
    if refusal is not None:
        raise InvalidInput(f"{field} URL points to {refusal}; refused", field=field)


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
    """
    transport = httpx.AsyncHTTPTransport()
    _use_network_backend(transport, _GuardedBackend(allow_private=allow_private))
    return httpx.AsyncClient(
        transport=transport, timeout=timeout_s, follow_redirects=False, trust_env=False
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


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks every address, then connects to a checked IP.

    httpcore passes the URL's hostname to `start_tls` separately, so certificates are still
    verified against the name in the URL, not against the IP we connect to.
    """

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
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        refusal = _first_refusal(addresses, allow_private=self._allow_private)
        if refusal is not None:
            raise RefusedAddress(f"URL host {host} resolves to {refusal}; refused")
        last_error: Exception = httpcore.ConnectError(f"no address found for host {host}")
        for address in addresses:
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


def _use_network_backend(
    transport: httpx.AsyncHTTPTransport, backend: httpcore.AsyncNetworkBackend
) -> None:
    """Make `transport` open its connections through `backend`.

    httpx has no public parameter for httpcore's network backend, so this swaps the
    transport's private `_pool` for an `httpcore.AsyncConnectionPool` (public API) built with
    httpx's default TLS settings and `backend`. Kept to this one function on purpose.
    """
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        network_backend=backend,
    )
