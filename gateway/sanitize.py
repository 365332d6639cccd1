"""Rich text that enters the gateway is sanitised once, on entry, with nh3
(the Rust ammonia sanitiser): only a small formatting subset survives, links
are http(s)/mailto only and get rel="noopener noreferrer nofollow"."""

from __future__ import annotations

import re
from html.parser import HTMLParser

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


class _TextOf(HTMLParser):
    """Collects the text of HTML: block ends and ``<br>`` become line breaks."""

    BLOCKS = frozenset({"p", "div", "blockquote", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self.skip += 1
        elif tag == "br":
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


_BLANK_LINES = re.compile(r"\n{3,}")


def html_to_text(html: str) -> str:
    """The readable text of ``html`` (for platforms and fields that take plain
    text): tags dropped, entities decoded, paragraphs as blank lines."""
    parser = _TextOf()
    parser.feed(html)
    parser.close()
    return clean_text(_BLANK_LINES.sub("\n\n", "".join(parser.parts)).strip())
