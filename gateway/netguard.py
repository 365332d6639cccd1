"""HTTP to addresses that other people chose, without becoming a way into the
operator's own network (server-side request forgery).

A linked site names an attachment URL; a fediverse server names a key, an
actor, an inbox. ``GuardedSession`` fetches or posts to such URLs:

* only ``http`` and ``https`` URLs that parse the one way every layer reads
  them (``check_url``): no control characters, spaces or user info, a port
  in range, a host name of DNS-sized labels (IDNA-encoded when it is not
  ASCII) or a well-formed IP literal; anything else is ``BadURL`` (a
  ``FetchError``), never a ``ValueError`` from deeper down;
* every address a host name resolves to is checked (``address_allowed``) by
  the connector's resolver, so the address checked is the address connected
  to (no DNS rebinding between check and use); a literal IP address is
  checked before connecting, and so is a host written as a number in another
  form (``127.1``, ``2130706433``, ``0177.0.0.1``, ``0x7f.1``: what a
  resolver would make of it), which is refused either way;
* redirects are followed by hand, each hop checked again (and signed again,
  when the caller signs requests), at most ``max_redirects``;
* the body is read up to ``max_bytes`` while it streams, not trusted from
  ``Content-Length``; a timeout bounds the whole exchange.

Private, loopback, link-local, shared (CGNAT), benchmarking and IPv4-mapped
forms of those addresses are refused unless the operator allows private
addresses (tests, or peers on the same private network).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import aiohttp
import idna
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from msgspec import Struct

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_EXTRA_BLOCKED = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("198.18.0.0/15"))


class FetchError(Exception):
    """The request could not be made or answered; ``transient`` if trying later may help."""

    def __init__(self, message: str, *, transient: bool, status: int = 0) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


class BadURL(FetchError):
    """A URL that is not a well-formed http(s) URL the gateway may fetch
    (its reason in the message); never transient."""

    def __init__(self, url: object, reason: str) -> None:
        super().__init__(f"{_shown(url)}: {reason}", transient=False)


def _shown(url: object) -> str:
    """``url`` for a message: quoted, control characters escaped, cut short."""
    text = repr(url)
    return text if len(text) <= 200 else text[:200] + "...'"


MAX_URL = 8192
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_UNSAFE = re.compile(r"[\x00-\x20\x7f\ud800-\udfff]")
"""Control characters, spaces and lone surrogates (undecodable bytes of a header)."""


def ascii_host(host: str) -> str:
    """``host`` (a name, without brackets or port) as the resolver gets it:
    IDNA-encoded (UTS 46, as aiohttp's URL parser does) and checked: labels of
    1-63 letters, digits, ``-`` or ``_``, at most 253 characters in all.
    ``ValueError`` otherwise."""
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise ValueError(f"the host name is not valid IDNA ({exc})") from None
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        raise ValueError("a host name has 1 to 253 characters")
    for label in name.split("."):
        if not _HOST_LABEL.fullmatch(label):
            raise ValueError(f"host label {label[:70]!r} is not 1-63 letters, digits, '-' or '_'")
    return host.lower()


def parse_url(url: object, *, max_length: int = MAX_URL) -> SplitResult:
    """The parts of ``url`` if it is a well-formed http(s) URL (see the module
    docstring; its syntax only, no address is looked at), else ``BadURL``.
    Callers that take URLs from others (an inbox reading ids) use it too, so
    that nothing deeper meets a URL that every layer would not read alike."""
    if not isinstance(url, str) or not url:
        raise BadURL(url, "not a URL")
    if len(url) > max_length:
        raise BadURL(url, f"longer than {max_length} characters")
    if _UNSAFE.search(url):
        raise BadURL(url, "control characters, spaces or undecodable bytes in a URL")
    try:
        parts = urlsplit(url)
        hostname, port = parts.hostname, parts.port
    except ValueError as exc:  # a bad IPv6 literal, a port out of range, NFKC tricks (U+FF03 ...)
        raise BadURL(url, str(exc)) from None
    if parts.scheme not in ("http", "https"):
        raise BadURL(url, "only http(s) URLs")
    if not hostname:
        raise BadURL(url, "no host")
    if parts.username is not None or parts.password is not None:
        raise BadURL(url, "user info in a URL")
    if port == 0:
        raise BadURL(url, "port 0")
    if "[" in parts.netloc:
        if not _is_ip(hostname.split("%", 1)[0]):
            raise BadURL(url, "not an IPv6 address between brackets")
    elif not _is_ip(hostname):
        try:
            ascii_host(hostname)
        except ValueError as exc:
            raise BadURL(url, str(exc)) from None
    return parts


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class AddressRefused(OSError):
    """A host name resolved only to addresses the gateway may not connect to."""


class Fetched(Struct, frozen=True):
    status: int
    url: str
    """The URL that answered (after redirects)."""
    content_type: str
    headers: dict[str, str]
    body: bytes


def address_allowed(address: str, *, allow_private: bool) -> bool:
    """Whether the gateway may connect to ``address`` (an IP address as text)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
    if ip.is_unspecified or ip.is_multicast:
        return False
    if ip.is_loopback or ip.is_private or ip.is_link_local or any(ip in n for n in _EXTRA_BLOCKED
                                                                  if ip.version == n.version):
        return allow_private
    return not ip.is_reserved


_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


def _numeric_ipv4(host: str) -> str | None:
    """The IPv4 address a host written as a number stands for (``127.1``,
    ``2130706433``, ``0177.0.0.1``, ``0x7f.1``), as a resolver reads it; None for
    a host name. A host whose last label is a number is never a DNS name (the
    WHATWG URL standard parses it as an IPv4 address), so one that is no
    address either comes back as ``"invalid"``, which no check allows."""
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if not _NUMBER.match(last):
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host.rstrip(".")))
    except (OSError, ValueError):
        return "invalid"


class _CheckingResolver(AbstractResolver):
    def __init__(self, allow_private: bool) -> None:
        self._inner = DefaultResolver()
        self._allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        found = await self._inner.resolve(host, port, family)
        allowed = [a for a in found if address_allowed(a["host"], allow_private=self._allow_private)]
        if not allowed:
            raise AddressRefused(f"{host} resolves only to addresses the gateway may not connect to")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


Signer = Callable[[str, str, Mapping[str, str], bytes | None], Mapping[str, str]]
"""(method, url, headers, body) -> headers to add, e.g. an HTTP signature."""


class GuardedSession:
    def __init__(self, *, allow_private: bool, timeout: float = 10.0, max_redirects: int = 3,
                 user_agent: str = "civic-gateway", connections: int = 32) -> None:
        self.allow_private = allow_private
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.user_agent = user_agent
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_CheckingResolver(self.allow_private), limit=self.connections,
                                             enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def check_url(self, url: str) -> None:
        """``BadURL`` unless ``url`` is a well-formed http(s) URL (``parse_url``);
        ``FetchError`` (never transient) unless a literal IP, in any of the
        forms a resolver reads as one, is an allowed address."""
        parts = parse_url(url)
        if parts.hostname and "[" not in parts.netloc and not _is_ip(parts.hostname):
            numeric = _numeric_ipv4(parts.hostname)
            if numeric is None:
                return  # a host name: the resolver checks its addresses
            if not address_allowed(numeric, allow_private=self.allow_private):
                raise FetchError(f"{url}: the gateway may not connect to {parts.hostname} ({numeric})",
                                 transient=False)
            raise FetchError(f"{url}: {parts.hostname} is not a canonical IPv4 address (write {numeric})",
                             transient=False)
        hostname = (parts.hostname or "").split("%", 1)[0]
        if not address_allowed(hostname, allow_private=self.allow_private):
            raise FetchError(f"{url}: the gateway may not connect to {hostname}", transient=False)

    async def request(self, method: str, url: str, *, max_bytes: int, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None, sign: Signer | None = None,
                      follow_redirects: bool = True) -> Fetched:
        """One exchange (redirects followed when asked); any status comes back,
        ``FetchError`` only when there was no answer or it broke a limit."""
        assert self._session is not None, "session not started"
        for _ in range(self.max_redirects + 1):
            self.check_url(url)
            h = {"User-Agent": self.user_agent, **(headers or {})}
            if sign is not None:
                h.update(sign(method, url, h, body))
            try:
                async with self._session.request(method, url, data=body, headers=h, allow_redirects=False) as resp:
                    if follow_redirects and resp.status in REDIRECTS and "Location" in resp.headers:
                        url = urljoin(url, resp.headers["Location"])
                        if resp.status == 303:
                            method, body = "GET", None
                        continue
                    if resp.content_length is not None and resp.content_length > max_bytes:
                        raise FetchError(f"{url}: {resp.content_length} bytes, more than {max_bytes}",
                                         transient=False, status=413)
                    data = await resp.content.read(max_bytes + 1)
                    if len(data) > max_bytes:
                        raise FetchError(f"{url}: more than {max_bytes} bytes", transient=False, status=413)
                    return Fetched(status=resp.status, url=url, content_type=resp.content_type or "",
                                   headers={k.lower(): v for k, v in resp.headers.items()}, body=data)
            except ValueError as exc:  # aiohttp's own URL parsing of a URL check_url let by (or a redirect)
                raise BadURL(url, f"{type(exc).__name__}: {exc}") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                refused = isinstance(exc, AddressRefused) or isinstance(getattr(exc, "os_error", None), AddressRefused)
                raise FetchError(f"{method} {url}: {type(exc).__name__}: {exc}", transient=not refused) from None
        raise FetchError(f"{url}: more than {self.max_redirects} redirects", transient=False)
