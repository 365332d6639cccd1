"""Gateway -> fake platform, pure: a ``Delivery`` to the native event it
becomes, fitted to the platform's capabilities. No I/O.

The platform gives the event its ``id`` when it takes it (``outbound``); the
event carries the delivery's ``event_id`` as ``key``, which the platform
uses as a transaction id: the same delivery sent twice is one event there.

What the fake does not carry (per ``FakeConfig``), it never emits: HTML
without ``html``, a reaction without ``reactions``; a content warning is
never dropped (its own ``cw`` field, or the first line of the text); an edit
without ``edits`` is a new post marked as a correction; a thread without
``threads`` is kept as what the post replies to.
"""

from __future__ import annotations

from typing import Any

import msgspec

from adapters.fake.config import FakeConfig
from adapters.fake.decode import OPS, POST_FIELDS
from gateway.kit import Capabilities, Delivery
from schemas.v1 import Message

TYPES = {type_: op for op, type_ in OPS.items()}
"""Schema event type -> native op."""
_NATIVE = {field: native for native, field in POST_FIELDS.items()}

CARRIES = frozenset(TYPES)
"""Every event type of the common schema (with every capability on; the
contract suite, tests/test_adapter_contract.py, checks it)."""
DEGRADATIONS: dict[str, dict[str, str]] = {}
"""Nothing is lost on a round trip with every capability on."""


def capabilities(config: FakeConfig) -> Capabilities:
    return Capabilities(html=config.html, content_warning=config.content_warning, reactions=config.reactions,
                        edits=config.edits, threads=config.threads, batch_max=config.batch_max)


def encode(d: Delivery, caps: Capabilities) -> dict[str, Any] | None:
    """The native event for ``d`` (without its ``id``), or None when the
    platform cannot carry it at all (a reaction without ``reactions``)."""
    op = TYPES[d.type]
    if op in ("react", "unreact") and not caps.reactions:
        return None
    if op in ("post", "edit"):
        msg: Message = d.payload
        if op == "edit" and not caps.edits:
            op = "post"
            msg = msgspec.structs.replace(msg, text=f"Correction: {msg.text}",
                                          html=f"<p>Correction:</p>{msg.html}" if msg.html else None)
        data = post(msg, caps)
    else:
        data = msgspec.to_builtins(d.payload)
    return {"op": op, "key": d.event_id, "room": d.group, "at": d.time, "data": data}


def post(msg: Message, caps: Capabilities) -> dict[str, Any]:
    """A message as the ``data`` of a native post, fitted to ``caps``."""
    if msg.warning and caps.content_warning == "first_line":
        msg = msgspec.structs.replace(msg, warning=None, text=f"CW: {msg.warning}\n\n{msg.text}",
                                      html=f"<p>CW: {_escape(msg.warning)}</p>{msg.html}" if msg.html else None)
    if not caps.html:
        msg = msgspec.structs.replace(msg, html=None)
    if not caps.threads and msg.thread is not None:
        msg = msgspec.structs.replace(msg, thread=None, reply_to=msg.reply_to or msg.thread)
    return {_NATIVE[k]: v for k, v in msgspec.to_builtins(msg).items()}


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["CARRIES", "DEGRADATIONS", "TYPES", "capabilities", "encode", "post"]
