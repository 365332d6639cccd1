"""Text that enters the gateway is cleaned once, on entry, whatever platform
it came from (``clean_payload``, called by ``Pipeline.prepare``).

Rich text is sanitised with nh3 (the Rust ammonia sanitiser): only a small
formatting subset survives, links are http(s)/mailto only and get
rel="noopener noreferrer nofollow". Every other text field of the common
schema loses its control characters (C0 such as NUL and ESC, DEL, C1): the
fields that may span lines (``Text``: a message, a report, alt text) keep
their line breaks as ``\n``; every other one (names, titles, warnings,
reasons, attachment names, reaction keys) is one line, its line breaks made
spaces; a URL loses its line breaks and tabs (as browsers read it). Ids are not touched: an id names something, and a decoder
refuses an id it cannot take rather than change it."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

import msgspec
import nh3

from schemas.v1 import EVENT_TYPES, Html, Id, Text, Url

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


# C0 controls (NUL, ESC, ...), DEL and C1 controls (0x80-0x9F, which some
# terminals and log viewers obey like ESC sequences) are dropped everywhere.
_CONTROL: dict[int, str | None] = {c: None for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A, 0x0D)}
_MULTI_LINE = {**_CONTROL, 0x0D: "\n"}  # a lone CR is a line break; CRLF is folded first
_URL_CONTROL = {**_CONTROL, 0x09: None, 0x0A: None, 0x0D: None}
_SINGLE_LINE = {**_CONTROL, 0x09: " ", 0x0A: " ", 0x0D: " ", 0x2028: " ", 0x2029: " "}


def clean_text(text: str) -> str:
    """Plain text that may span lines: control characters dropped except tab
    and line breaks, which become ``\\n`` (CRLF and a lone CR alike). Returns
    ``text`` itself when there was nothing to clean."""
    if text.isprintable():
        return text
    return text.replace("\r\n", "\n").translate(_MULTI_LINE)


def clean_line(text: str) -> str:
    """One line of text (a name, a title, a reason): control characters
    dropped, line breaks and tabs made spaces. Returns ``text`` itself when
    there was nothing to clean."""
    if text.isprintable():
        return text
    return text.replace("\r\n", " ").translate(_SINGLE_LINE)


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


# -- every text field of a payload ----------------------------------------------------------------

def _line_or_none(value: str) -> str | None:
    """A one-line optional field: a name of nothing but control characters is no name."""
    new = clean_line(value)
    return None if not new and value else new


def _url(value: str) -> str:
    """As browsers read URLs: tabs and line breaks dropped too."""
    return value if value.isprintable() else value.translate(_URL_CONTROL)


def _html(value: str) -> str:
    return clean_text(clean_html(value))


def _each(values: tuple[Any, ...]) -> tuple[Any, ...]:
    new = tuple(clean_payload(v) for v in values)
    return values if all(a is b for a, b in zip(new, values)) else new


Cleaner = Callable[[Any], Any]


def _how(hint: Any, optional: bool = False) -> Cleaner | None:
    """How a field of this type is cleaned (None: not at all)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        inner = [a for a in args if a is not type(None)]
        return _how(inner[0], optional=True) if len(inner) == 1 else None
    if hint == Text:
        return clean_text
    if hint == Html:
        return _html
    if hint == Id:
        return None
    if hint == Url:
        return _url
    if typing.get_origin(hint) is typing.Annotated:
        hint = args[0]
        args = typing.get_args(hint)
    if hint is str:
        return _line_or_none if optional else clean_line
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return clean_payload
    if typing.get_origin(hint) is tuple and args and isinstance(args[0], type) and issubclass(args[0], msgspec.Struct):
        return _each
    return None


_PLANS: dict[type, tuple[tuple[str, Cleaner], ...]] = {}


def _plan(cls: type) -> tuple[tuple[str, Cleaner], ...]:
    """The fields of a schema struct to clean, and how (worked out once per type)."""
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        plan = tuple((name, how) for name in cls.__struct_fields__  # type: ignore[attr-defined]
                     if (how := _how(hints[name])) is not None)
        _PLANS[cls] = plan
    return plan


def clean_payload(payload: Any) -> Any:
    """``payload`` (a schema struct) with every text field cleaned as the
    module docstring says; the very same object when nothing needed cleaning
    (the common case costs one ``isprintable`` per field)."""
    changes: dict[str, Any] = {}
    for name, how in _plan(type(payload)):
        value = getattr(payload, name)
        if not value:
            continue
        new = how(value)
        if new is not value and new != value:
            changes[name] = new
    return msgspec.structs.replace(payload, **changes) if changes else payload


for _cls in set(EVENT_TYPES.values()):
    _plan(_cls)
