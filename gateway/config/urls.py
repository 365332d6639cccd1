"""URL-valued settings: one check for every URL a config holds (the core's
and each adapter's), called from the settings structs' ``__post_init__``.

Errors are ``ValueError("`key`: ...")``, which ``gateway.config.loading``
turns into "file:line: table.key: ..." like every config error; warnings go
through ``warn`` and come out the same way in ``Config.warnings``.
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
import unicodedata
from urllib.parse import SplitResult, urlsplit

pending_warnings: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "civic_config_warnings", default=None)
"""Where ``warn`` collects, while ``gateway.config.loading`` converts one table (None otherwise)."""
_HOST = re.compile(r"^[\w.-]+$")  # letters (any script), digits, '_', '.', '-'


def warn(key: str, message: str) -> None:
    """Called from a settings struct's ``__post_init__``: a setting that works
    but probably should not be used as it is. ``check-config`` prints it and
    ``run`` logs it, with the file, line and key (outside a config conversion
    it is dropped)."""
    found = pending_warnings.get()
    if found is not None:
        found.append((key, message))


def is_loopback(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ``::1``."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bad_char(value: str) -> str | None:
    for ch in value:
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            return "a space" if ch == " " else f"the character U+{ord(ch):04X}"
    return None


def redacted(url: str) -> str:
    """``url`` for an error message: a password in it shown as ``***``."""
    return repr(re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@]*?:)[^/@]*@", r"\1***@", url))


def check_url(key: str, url: str, schemes: tuple[str, ...], *, example: str, need_host: bool = True,
              public_tls: bool = False) -> SplitResult:
    """Check the URL-valued setting ``key`` and return its parts; a settings
    struct's ``__post_init__`` calls it for each URL it holds. Refused (with
    ``ValueError("`key`: ...")``): a scheme not in ``schemes``; whitespace or a
    control character anywhere (percent-encode them); no host (unless
    ``need_host`` is false, e.g. a PostgreSQL URL over a Unix socket); a host
    that is not a name or an IP address; a port outside 1..65535.

    ``public_tls``: the URL is where other servers on the internet reach the
    gateway (ActivityPub's ``base_url``), so it must be ``https``; plain
    ``http`` is only accepted on a loopback host (tests, a reverse proxy's
    upstream), with a warning."""
    shown = f"e.g. \"{example}\""
    shown_url = redacted(url)
    bad = bad_char(url)
    if bad is not None:
        raise ValueError(f"`{key}`: {bad} is not allowed in a URL (percent-encode it), in {shown_url}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. a bracketed host that is not an IPv6 address
        raise ValueError(f"`{key}`: not a valid URL ({exc}): {shown_url}") from None
    if parts.scheme.lower() not in schemes or not url.lower().startswith(parts.scheme.lower() + "://"):
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"`{key}`: expected {wanted}..., {shown}, not {shown_url}")
    multi_host = "," in parts.netloc  # libpq's host1:port1,host2:port2
    host = parts.hostname or ""
    if need_host and not host.strip("."):
        raise ValueError(f"`{key}`: the URL names no host, {shown}, not {shown_url}")
    if host and not multi_host and "[" not in parts.netloc and not _HOST.match(host):
        raise ValueError(f"`{key}`: {host!r} is not a host name or IP address, {shown}")
    if not multi_host:
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"`{key}`: the port must be a number from 1 to 65535, in {shown_url}")
    if public_tls and parts.scheme.lower() != "https":
        if not is_loopback(host):
            raise ValueError(f"`{key}`: must be https:// (fediverse servers only talk to https), not {shown_url}")
        warn(key, f"plain http on {host} is only reachable from this machine, and fediverse servers "
                  f"talk to https only: use this for tests, not for the public address")
    return parts
