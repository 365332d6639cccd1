"""Rich text that enters the gateway is sanitised once, on entry, with nh3
(the Rust ammonia sanitiser): only a small formatting subset survives, links
are http(s)/mailto only and get rel="noopener noreferrer nofollow"."""

from __future__ import annotations

import nh3

TAGS = {
    "a", "b", "blockquote", "br", "code", "del", "details", "em", "h1", "h2", "h3", "h4", "h5", "h6",
    "hr", "i", "li", "ol", "p", "pre", "s", "span", "strong", "sub", "summary", "sup", "u", "ul",
}
ATTRIBUTES = {"a": {"href", "title"}, "span": {"data-mx-spoiler", "lang"}, "code": {"class"}}
URL_SCHEMES = {"http", "https", "mailto"}

# Built once: constructing the sanitiser costs more than cleaning a message.
_cleaner = nh3.Cleaner(tags=TAGS, attributes=ATTRIBUTES, url_schemes=URL_SCHEMES,
                       link_rel="noopener noreferrer nofollow", strip_comments=True)


def clean_html(html: str) -> str:
    """Sanitised HTML (never raises; worst case an empty string)."""
    return _cleaner.clean(html)


_CONTROL = {c: None for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)}
_CONTROL[0x7F] = None


def clean_text(text: str) -> str:
    """Plain text without control characters other than tab and newlines."""
    if text.isprintable():
        return text
    return text.translate(_CONTROL)
