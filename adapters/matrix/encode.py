"""Gateway -> Matrix, pure: schema payloads to Matrix event content, ghost
localparts and display names. No I/O.

Ids given here are already Matrix's own (event ids, user ids), translated by
the core or looked up by the adapter. Media is referenced by ``mxc://`` URIs:
the adapter uploads what is not on the homeserver yet and passes the URI.
"""

from __future__ import annotations

import hashlib
import html as _html
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from adapters.matrix.decode import HTML_FORMAT, plain_to_html
from schemas.v1 import Actor, Attachment, Message, MessageDeletion, ModerationAction

ANONYMOUS_LABEL = "anonymous member"
"""The display name of an anonymous author's ghost: never their name or handle."""
MAX_DISPLAY_NAME = 256
MAX_LOCALPART = 200
"""A user id is at most 255 bytes; this leaves room for ``@``, ``:`` and the server name."""


# -- messages -----------------------------------------------------------------------------------

def message_content(msg: Message, *, reply_to_event: str | None = None, thread_root: str | None = None,
                    thread_latest: str | None = None, mention_users: Sequence[str] = (),
                    pills: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """``m.room.message`` content (``msgtype: m.text``) for ``msg``'s text.

    ``body`` is the plain text; with a warning it starts ``CW: <warning>`` and a
    blank line, so text-only clients see the warning before the text. HTML (or
    the text as HTML) goes in ``formatted_body``, wrapped in a
    ``data-mx-spoiler`` span when there is a warning (a ``sensitive`` message
    without one gets a spoiler without a reason). A ``title`` becomes a first
    line (bold in the HTML). ``reply_to_event``: the
    event replied to (``m.in_reply_to``, no fallback: spec v1.13 dropped it).
    ``thread_root``: the thread's root event (``rel_type: m.thread``); without a
    reply the thread falls back to ``thread_latest`` (or the root) for clients
    without threads (``is_falling_back: true``). ``m.mentions`` lists
    ``mention_users`` (empty: nobody is pinged by name matching). ``pills``:
    (user id, name) of mentioned people: the first ``@name`` in the text becomes
    a link to the user (a "pill", as clients show mentions)."""
    content: dict[str, Any] = {"msgtype": "m.text", **_text_fields(msg, pills)}
    relates = _relates_to(reply_to_event, thread_root, thread_latest)
    if relates:
        content["m.relates_to"] = relates
    content["m.mentions"] = mentions(mention_users)
    return content


def _text_fields(msg: Message, pills: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    body = msg.text
    fields: dict[str, Any] = {}
    html = msg.html if msg.html and msg.html.strip() else None  # blank HTML says nothing
    if pills:
        base = html if html is not None else plain_to_html(msg.text)
        pilled = with_pills(base, pills)
        if pilled != base:
            html = pilled
    if msg.title:  # Matrix has no titles: a first line (not read back by decode)
        body = f"{msg.title}\n\n{body}"
        html = (f"<strong>{_html.escape(msg.title, quote=False)}</strong><br>"
                f"{html if html is not None else plain_to_html(msg.text)}")
    if msg.warning or msg.sensitive:
        inner = html if html is not None else plain_to_html(body)
        if msg.warning:
            body = f"CW: {msg.warning}\n\n{body}"
            html = f'<span data-mx-spoiler="{_html.escape(msg.warning, quote=True)}">{inner}</span>'
        else:  # sensitive without a warning: a spoiler without a reason
            html = f"<span data-mx-spoiler>{inner}</span>"
    fields["body"] = body
    if html is not None:
        fields["format"] = HTML_FORMAT
        fields["formatted_body"] = html
    return fields


def _relates_to(reply_to_event: str | None, thread_root: str | None,
                thread_latest: str | None) -> dict[str, Any] | None:
    if thread_root is not None:
        return {
            "rel_type": "m.thread",
            "event_id": thread_root,
            "is_falling_back": reply_to_event is None,
            "m.in_reply_to": {"event_id": reply_to_event or thread_latest or thread_root},
        }
    if reply_to_event is not None:
        return {"m.in_reply_to": {"event_id": reply_to_event}}
    return None


def with_pills(html: str, pills: Sequence[tuple[str, str]]) -> str:
    """``html`` with the first ``@name`` of each (user id, name) made a pill:
    ``<a href="https://matrix.to/#/@user:server">name</a>``."""
    for user, name in pills:
        if not name:
            continue
        needle = "@" + _html.escape(name, quote=False)
        at = html.find(needle)
        if at < 0:
            continue
        href = "https://matrix.to/#/" + quote(user, safe="@:")
        html = (f'{html[:at]}<a href="{_html.escape(href, quote=True)}">{_html.escape(name, quote=False)}</a>'
                f'{html[at + len(needle):]}')
    return html


def mentions(user_ids: Sequence[str]) -> dict[str, Any]:
    """``m.mentions``: the user ids once each, in order."""
    unique = list(dict.fromkeys(user_ids))
    return {"user_ids": unique} if unique else {}


def edit_content(msg: Message, *, target_event: str, mention_users: Sequence[str] = (),
                 new_mention_users: Sequence[str] = ()) -> dict[str, Any]:
    """An ``m.replace`` edit of ``target_event`` (the original, never an edit)
    with ``msg``'s full new content in ``m.new_content``; the outer ``body``
    (and ``formatted_body``) is the fallback with a ``* `` prefix.
    ``m.mentions`` outside holds only the users newly mentioned (spec), inside
    all of them."""
    new = {"msgtype": "m.text", **_text_fields(msg), "m.mentions": mentions(mention_users)}
    content: dict[str, Any] = {"msgtype": "m.text", "body": f"* {new['body']}"}
    if "formatted_body" in new:
        content["format"] = HTML_FORMAT
        content["formatted_body"] = f"* {new['formatted_body']}"
    content["m.new_content"] = new
    content["m.relates_to"] = {"rel_type": "m.replace", "event_id": target_event}
    content["m.mentions"] = mentions(new_mention_users)
    return content


def attachment_content(attachment: Attachment, *, mxc_url: str | None = None, reply_to_event: str | None = None,
                       thread_root: str | None = None, thread_latest: str | None = None) -> dict[str, Any]:
    """``m.image`` (an image media type) or ``m.file`` content for one attachment.
    ``mxc_url``: where the adapter uploaded it (default: the attachment's own URL
    when it is already ``mxc://``). ``body`` is the alt text for an image, else
    the file name; ``filename`` is set when there is a name."""
    url = mxc_url or attachment.url
    if not url.startswith("mxc://"):
        raise ValueError(f"attachment {attachment.url!r}: upload it first and pass its mxc:// URI")
    image = attachment.media_type.startswith("image/")
    name = attachment.name or _name_from_url(attachment.url)
    content: dict[str, Any] = {
        "msgtype": "m.image" if image else "m.file",
        "body": (attachment.alt or name) if image else name,
        "url": url,
        "info": {"mimetype": attachment.media_type},
    }
    if attachment.name:
        content["filename"] = attachment.name
    if attachment.size is not None:
        content["info"]["size"] = attachment.size
    relates = _relates_to(reply_to_event, thread_root, thread_latest)
    if relates:
        content["m.relates_to"] = relates
    return content


def _name_from_url(url: str) -> str:
    tail = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    return tail or "attachment"


# -- reactions, redactions ----------------------------------------------------------------------

def reaction_content(event_id: str, key: str) -> dict[str, Any]:
    """``m.reaction`` content: an ``m.annotation`` of ``event_id`` with ``key``."""
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}}


def redaction_reason(payload: MessageDeletion | ModerationAction) -> str | None:
    """The ``reason`` of the redaction for a deletion or a moderation removal
    (a moderation removal without a reason says its category, if any)."""
    if payload.reason:
        return payload.reason
    category = getattr(payload, "category", None)
    return category.replace("_", " ") if category else None


def redaction_content(payload: MessageDeletion | ModerationAction, target_event: str) -> dict[str, Any]:
    """``m.room.redaction`` content (room v11+: ``redacts`` in the content)."""
    content: dict[str, Any] = {"redacts": target_event}
    reason = redaction_reason(payload)
    if reason:
        content["reason"] = reason
    return content


# -- people -------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def member_display_name(actor: Actor) -> str:
    """The display name of ``actor``'s ghost, as their identity level allows:
    identified and pseudonymous, their name (their id when they have none);
    anonymous, a neutral label, never the name or handle. (For an anonymous
    author the gateway already passes a per-group stand-in id, so the ghost
    itself is unlinkable across groups.)"""
    if actor.identity == "anonymous":
        return ANONYMOUS_LABEL
    name = _CONTROL.sub(" ", actor.name or "").strip() or actor.id
    return name[:MAX_DISPLAY_NAME]


_KEEP = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-/")
_LOCALPART_PREFIX = re.compile(r"^[a-z0-9._=/-]*$")


def ghost_localpart(prefix: str, stand_in_id: str, *, max_length: int = MAX_LOCALPART) -> str:
    """A valid, stable localpart for the ghost of ``stand_in_id``: ``prefix``
    then the id escaped (``a-z 0-9 . - /`` kept; ``_`` as ``__``; an upper-case
    letter as ``_`` and the letter; every other byte of its UTF-8 as ``=xx``),
    so different ids give different localparts. One longer than ``max_length``
    is cut and ends in ``-`` and 16 hex digits of its SHA-256."""
    if not _LOCALPART_PREFIX.match(prefix):
        raise ValueError(f"ghost prefix {prefix!r}: only a-z 0-9 . _ = - / are allowed")
    out = []
    for c in stand_in_id:
        if c in _KEEP:
            out.append(c)
        elif c == "_":
            out.append("__")
        elif "A" <= c <= "Z":
            out.append("_" + c.lower())
        else:
            out.append("".join(f"={b:02x}" for b in c.encode("utf-8", "surrogatepass")))
    local = prefix + "".join(out)
    if len(local) > max_length:
        digest = hashlib.sha256(stand_in_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        local = local[:max_length - 17] + "-" + digest
    return local


def stand_in_of(prefix: str, user_id: str, server_name: str) -> str | None:
    """The stand-in id a ghost user id stands for (``ghost_localpart`` undone),
    or ``None`` when ``user_id`` is no ghost or was shortened with a hash."""
    head, tail = "@" + prefix, ":" + server_name
    if not (user_id.startswith(head) and user_id.endswith(tail)):
        return None
    local = user_id[len(head):len(user_id) - len(tail)]
    if len(prefix) + len(local) == MAX_LOCALPART and re.search(r"-[0-9a-f]{16}$", local):
        return None  # shortened with a hash: not reversible
    out, raw, i = [], bytearray(), 0
    try:
        while i < len(local):
            c = local[i]
            if c == "=":
                raw.append(int(local[i + 1:i + 3], 16))
                i += 3
                continue
            if raw:
                out.append(raw.decode("utf-8", "surrogatepass"))
                raw.clear()
            if c == "_":
                nxt = local[i + 1]
                out.append("_" if nxt == "_" else nxt.upper())
                if nxt != "_" and not "a" <= nxt <= "z":
                    return None
                i += 2
            elif c in _KEEP:
                out.append(c)
                i += 1
            else:
                return None
        if raw:
            out.append(raw.decode("utf-8", "surrogatepass"))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    stand_in = "".join(out)
    return stand_in if stand_in and ghost_localpart(prefix, stand_in) == prefix + local else None


# -- what crosses (checked by the contract suite, tests/test_adapter_contract.py) --------------------

CARRIES = frozenset({"civic.message.created", "civic.message.edited", "civic.message.deleted",
                     "civic.reaction.added", "civic.reaction.removed", "civic.membership.changed",
                     "civic.moderation.action"})
"""Event types that become room events and read back as the same type.
Not carried into the room: ``civic.report.filed`` (goes to the homeserver's
admins, not the room), ``civic.profile.updated`` (a ghost's display name),
``civic.account.moved`` (the core shows the person by their new account)."""
DEGRADATIONS: dict[str, dict[str, str]] = {
    "civic.membership.changed": {"by": "a kick or ban is done by the gateway's bot, which the room names as its author"},
    "civic.moderation.action": {"by": "a removal is a redaction by the gateway's bot, which the room names as its author"},
}
"""Fields of a payload that come back changed after a trip through a room."""
