"""Media links between the homeserver's media repository and other platforms. Pure.

Homeservers serve media only to their own users now (authenticated media,
spec v1.11), so an ``mxc://`` URI means nothing to another platform. An
attachment leaving Matrix therefore points at the gateway instead:
``<media_url>/media/<server>/<media id>?sig=<hmac>``, which the gateway serves
by downloading it with the appservice's token (up to ``media_max_bytes``).
The signature is an HMAC of the URI under a key derived from ``hs_token``, so
only media that actually crossed a link can be fetched through the gateway,
not every file on the hub.

Coming in, an attachment is copied into the homeserver's media repository (the
adapter downloads it within the size limit, then uploads it); a link the
gateway itself made for this homeserver turns straight back into its ``mxc://``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from urllib.parse import quote, unquote, urlsplit

from schemas.v1 import Attachment

_MXC = re.compile(r"^mxc://([A-Za-z0-9.:\[\]-]+)/([A-Za-z0-9_-]+)$")


def media_key(hs_token: str) -> bytes:
    return hashlib.sha256(b"civic-gateway media links|" + hs_token.encode()).digest()


def parse_mxc(uri: str) -> tuple[str, str] | None:
    """(server name, media id) of an ``mxc://`` URI, or ``None``."""
    m = _MXC.match(uri)
    return (m.group(1), m.group(2)) if m else None


def signature(key: bytes, server: str, media_id: str) -> str:
    return hmac.new(key, f"{server}/{media_id}".encode(), hashlib.sha256).hexdigest()[:32]


def public_url(base: str, key: bytes, mxc: str) -> str | None:
    """The gateway link that serves ``mxc`` (``None`` if it is no valid mxc URI)."""
    parsed = parse_mxc(mxc)
    if parsed is None:
        return None
    server, media_id = parsed
    return f"{base}/media/{quote(server, safe='')}/{media_id}?sig={signature(key, server, media_id)}"


def verify(key: bytes, server: str, media_id: str, sig: str) -> bool:
    return hmac.compare_digest(signature(key, server, media_id), sig)


def mxc_of_public(base: str, key: bytes, url: str) -> str | None:
    """The ``mxc://`` URI behind a link ``public_url`` made (signature checked), else ``None``."""
    if not url.startswith(base + "/media/"):
        return None
    parts = urlsplit(url)
    tail = url[len(base) + len("/media/"):].split("?", 1)[0].split("/")
    sig = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("sig", "")
    if len(tail) != 2:
        return None
    server, media_id = unquote(tail[0]), tail[1]
    if not verify(key, server, media_id, sig):
        return None
    return f"mxc://{server}/{media_id}"


def outgoing(att: Attachment, base: str, key: bytes) -> Attachment:
    """``att`` as other platforms get it: an ``mxc://`` URL becomes a gateway link."""
    url = public_url(base, key, att.url) if att.url.startswith("mxc://") else None
    if url is None:
        return att
    return Attachment(url=url, media_type=att.media_type, alt=att.alt, name=att.name, size=att.size)
