"""Matrix -> gateway, pure: one Matrix event (a dict as the homeserver pushes it
in an appservice transaction) to schema payloads with Matrix's own ids. No I/O.

Ids stay native: message ids are event ids (``$...``), people are user ids
(``@localpart:server``), the group is the room id. The core swaps them for
canonical ids.

``decode_event`` answers ``Decoded`` (one or more schema events) or ``Ignored``
(with a short reason code) for what the gateway does not carry: echoes of its
own ghosts and bot, state events it does not map, encrypted events, already
redacted events. A malformed event raises ``MatrixDecodeError`` naming the
field (``content.body``, ``redacts``, ...) and a reason code for metrics
(``malformed``, ``bad_id``, ``bad_number``, ``schema_limit``).

``check_envelope`` is the first step of ``decode_event``, also usable alone
(the appservice screens a transaction with it before anything else reads its
events): an object whose ``type``, ``sender``, ``event_id`` and ``room_id``
are strings, ids without control characters (a NUL would reach the store),
``content`` and ``unsigned`` objects, ``state_key`` a string like an id, and
``origin_server_ts`` an integer of milliseconds that every target can write
(1970 .. 9999: a timestamp of 2**64 would make the event unsendable).

Things the pure codec cannot know and the adapter passes in:

* ``redacted``: the event a redaction removes, as the adapter recorded it (its
  ``sender``, and for a reaction its ``m.relates_to``). With it, a redaction by
  the author is a deletion, by someone else a moderation removal, and a
  redacted reaction is a reaction removed. Without it the redaction is a
  deletion with ``by`` set to whoever redacted.
* ``prev_power_levels``: the previous ``m.room.power_levels`` content, when the
  event's ``unsigned.prev_content`` is missing.

Policy rules (``m.policy.rule.user`` / ``m.policy.rule.server``) are read with
``decode_policy_rule``; ``decode_event`` ignores them (reason ``policy_rule``)
because only rules from the policy room the operator names count.
"""

from __future__ import annotations

import html as _html
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import unquote

import msgspec

from gateway import kit
from gateway.kit import DecodeError, EventId, GroupId, Ignored, Inbound, Item, PlatformName, schema_problem
from schemas.cloudevents import LATEST_TIME
from schemas.v1 import (
    Actor,
    Attachment,
    Membership,
    Message,
    MessageDeletion,
    ModerationAction,
    Reaction,
    Role,
)

HTML_FORMAT = "org.matrix.custom.html"
GENERIC_WARNING = "spoiler"
"""The warning given to a spoiler that names no reason."""
MEDIA_MSGTYPES = {"m.image": "image/png", "m.file": "application/octet-stream", "m.video": "video/mp4",
                  "m.audio": "audio/mpeg"}
"""Media msgtypes and the media type assumed when ``info.mimetype`` is missing or malformed."""
_MEDIA_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+$")

# Ignored.reason codes
ECHO = "echo"                      # sent by the gateway's bot or one of its ghosts
UNSUPPORTED = "unsupported_type"   # an event type the gateway does not carry
STATE_NOT_CARRIED = "state_not_carried"
REDACTED = "redacted"              # an event whose content was already redacted
PROFILE_CHANGE = "profile_change"  # a join -> join (display name or avatar change)
POLICY_RULE = "policy_rule"        # read those with decode_policy_rule
NO_CHANGE = "no_change"            # e.g. power levels that changed no role
BOT_MEMBERSHIP = "bot_membership"  # the bot's own membership

# MatrixDecodeError.reason codes (the events refused, by reason, are a metric)
MALFORMED = "malformed"            # a field of the wrong type or shape
BAD_ID = "bad_id"                  # an id (or state key) with control characters, empty or too long
BAD_NUMBER = "bad_number"          # a number out of range (origin_server_ts)
SCHEMA_LIMIT = "schema_limit"      # does not fit the common schema's limits

ID_MAX = 255
"""Longest id (in UTF-8 bytes): the spec's limit for user, room and event ids."""
TS_MAX = int(LATEST_TIME) * 1000
"""Latest ``origin_server_ts`` taken (milliseconds): the end of year 9999."""
SIZE_MAX = 2**53 - 1
"""Largest attachment size passed on (larger ones are dropped): what every JSON reader reads exactly."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class MatrixDecodeError(DecodeError):
    """A Matrix event the gateway cannot read; ``field`` names where
    (``content.body``), ``reason`` is one of the reason codes above."""

    def __init__(self, message: str, *, field: str, reason: str = MALFORMED) -> None:
        super().__init__(f"`{field}`: {message}", field=field)
        self.reason = reason


class Decoded(kit.Decoded, frozen=True, kw_only=True):
    """What one Matrix event means, in its room and at its time."""

    group: str
    """The room id."""
    time: float
    """``origin_server_ts`` in Unix seconds."""

    def to_inbound(self, platform: PlatformName, *, now: float) -> list[Inbound]:
        """The ``Inbound`` records for the core (``now`` when the event has no timestamp)."""
        time = self.time or now
        return [Inbound(platform=platform, group=GroupId(self.group), event_id=EventId(i.event_id), type=i.type,
                        payload=i.payload, time=time) for i in self.items]


class PolicyRule(msgspec.Struct, frozen=True):
    """An ``m.policy.rule.user`` / ``m.policy.rule.server`` rule."""

    kind: Literal["user", "server"]
    entity_glob: str
    """A glob (``*`` any run, ``?`` one character) over user ids or server names."""
    recommendation: str
    """``m.ban`` is the one the spec defines; others are passed on as they are."""
    reason: str | None = None
    state_key: str = ""
    """Identifies the rule in its room: a later event with the same key replaces it."""
    removed: bool = False
    """True when the rule was withdrawn (its content emptied)."""


# -- entry point --------------------------------------------------------------------------------

def check_envelope(event: Any) -> None:
    """Raise ``MatrixDecodeError`` unless ``event`` has the shape every event
    must have (see the module docstring); what each type needs is checked later."""
    if not isinstance(event, Mapping):
        raise MatrixDecodeError("an event is a JSON object", field="$")
    _str(event, "type")
    for key in ("sender", "event_id", "room_id"):
        _id(event, key)
    for key in ("content", "unsigned"):
        if not isinstance(event.get(key, {}), Mapping):
            raise MatrixDecodeError("must be an object", field=key)
    if "state_key" in event:
        key = event["state_key"]
        if not isinstance(key, str):
            raise MatrixDecodeError("must be a string", field="state_key")
        if key and not _id_ok(key):
            raise MatrixDecodeError("must hold no control characters and at most 255 bytes", field="state_key",
                                    reason=BAD_ID)
    ts = event.get("origin_server_ts")
    if ts is not None and (not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts <= TS_MAX):
        raise MatrixDecodeError(f"must be an integer of milliseconds from 0 to {TS_MAX}",
                                field="origin_server_ts", reason=BAD_NUMBER)


def decode_event(event: Mapping[str, Any], *, bot_user: str, ghost_prefix: str, server_name: str,
                 redacted: Mapping[str, Any] | None = None,
                 prev_power_levels: Mapping[str, Any] | None = None) -> Decoded | Ignored:
    """The schema meaning of one Matrix event (see the module docstring)."""
    check_envelope(event)
    etype = event["type"]
    sender = event["sender"]
    if sender == bot_user or is_ghost(sender, ghost_prefix=ghost_prefix, server_name=server_name):
        return Ignored(ECHO)
    content = event.get("content")
    if not isinstance(content, Mapping):
        raise MatrixDecodeError("must be an object", field="content")
    room = event["room_id"]
    event_id = event["event_id"]
    ts = event.get("origin_server_ts")
    time = ts / 1000.0 if ts else 0.0
    unsigned = event.get("unsigned", {})
    state = "state_key" in event

    items: list[Item]
    if etype == "m.room.message" and not state:
        if not content or "redacted_because" in unsigned:
            return Ignored(REDACTED)
        items = [_message(event_id, sender, content)]
    elif etype == "m.reaction" and not state:
        rel = content.get("m.relates_to")
        if not isinstance(rel, Mapping) or rel.get("rel_type") != "m.annotation":
            return Ignored(REDACTED if not content else UNSUPPORTED)
        target = _id(rel, "event_id", "content.m.relates_to.event_id")
        key = _str(rel, "key", "content.m.relates_to.key")
        items = [Item("civic.reaction.added", Reaction(message=target, author=Actor(sender), key=key), event_id)]
    elif etype == "m.room.redaction" and not state:
        items = [_redaction(event, event_id, sender, content, redacted)]
    elif etype == "m.room.member" and state:
        result = _membership(event, event_id, sender, content, unsigned, bot_user)
        if isinstance(result, Ignored):
            return result
        items = [result]
    elif etype == "m.room.power_levels" and state:
        old = prev_power_levels if prev_power_levels is not None else unsigned.get("prev_content")
        changes = role_changes(old if isinstance(old, Mapping) else {}, content)
        if not changes:
            return Ignored(NO_CHANGE)
        by = Actor(sender)
        items = [Item("civic.membership.changed", Membership(member=Actor(user), state="role_changed", role=role,
                                                             by=by), f"{event_id}|{user}")
                 for user, role in changes]
    elif etype in ("m.policy.rule.user", "m.policy.rule.server", "m.policy.rule.room"):
        return Ignored(POLICY_RULE)
    elif state:
        return Ignored(STATE_NOT_CARRIED)
    else:
        return Ignored(UNSUPPORTED)
    for item in items:
        _validate(item)
    return Decoded(group=room, time=time, items=tuple(items))


def is_ghost(user_id: str, *, ghost_prefix: str, server_name: str) -> bool:
    """Whether ``user_id`` is one of the gateway's ghosts (``@<prefix>...:<server_name>``)."""
    return user_id.startswith("@" + ghost_prefix) and user_id.endswith(":" + server_name)


# -- messages -----------------------------------------------------------------------------------

_MX_REPLY = re.compile(r"<mx-reply>.*?</mx-reply>", re.DOTALL | re.IGNORECASE)
_FALLBACK_FIRST_LINE = re.compile(r"^> (\* )?<[@!#]")
_SPOILER_OPEN = re.compile(r"""<span\s+data-mx-spoiler(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>"']+)))?\s*>""",
                           re.IGNORECASE)
_SPAN_TAG = re.compile(r"<(/?)span\b[^>]*>", re.IGNORECASE)
_PILL = re.compile(r"""<a\s[^>]*href\s*=\s*["']https://matrix\.to/#/((?:@|%40)[^"'?/]+)[^"']*["']""", re.IGNORECASE)


def _message(event_id: str, sender: str, content: Mapping[str, Any]) -> Item:
    rel = content.get("m.relates_to")
    rel = rel if isinstance(rel, Mapping) else {}
    if rel.get("rel_type") == "m.replace":
        target = _id(rel, "event_id", "content.m.relates_to.event_id")
        new = content.get("m.new_content")
        if not isinstance(new, Mapping):
            raise MatrixDecodeError("an edit (m.replace) needs the new content", field="content.m.new_content")
        msg = message_from_content(target, sender, new, field="content.m.new_content")
        return Item("civic.message.edited", msg, event_id)
    return Item("civic.message.created", message_from_content(event_id, sender, content), event_id)


def message_from_content(message_id: str, sender: str, content: Mapping[str, Any], *,
                         field: str = "content") -> Message:
    """A ``Message`` from ``m.room.message`` content: text, HTML, reply, thread,
    mentions, spoiler (warning) and media."""
    body = content.get("body", "")
    if not isinstance(body, str):
        raise MatrixDecodeError("must be a string", field=f"{field}.body")
    msgtype = content.get("msgtype")
    if msgtype is not None and not isinstance(msgtype, str):
        raise MatrixDecodeError("must be a string", field=f"{field}.msgtype")
    formatted = content.get("formatted_body") if content.get("format") == HTML_FORMAT else None
    if formatted is not None and not isinstance(formatted, str):
        raise MatrixDecodeError("must be a string", field=f"{field}.formatted_body")

    reply_to, thread = _relations(content, field)
    rel = content.get("m.relates_to")
    if isinstance(rel, Mapping) and "m.in_reply_to" in rel:
        body = strip_reply_fallback(body)  # a rich reply fallback, also of a thread's fallback reply
    if formatted is not None:  # spec: clients strip <mx-reply> whatever the relation
        formatted = _MX_REPLY.sub("", formatted)

    warning, raw_reason, html = None, "", formatted
    if formatted is not None:
        warning, raw_reason, html = _spoiler(formatted)
    text = body
    if warning is not None:
        for prefix in (f"CW: {raw_reason}\n\n", f"CW: {warning}\n\n"):
            if text.startswith(prefix):  # the plain-text fallback the encoder writes
                text = text[len(prefix):]
                break
        if html is not None and html == plain_to_html(text):
            html = None  # the HTML only carried the spoiler
    if html is not None and not html.strip():
        html = None

    attachments: tuple[Attachment, ...] = ()
    if msgtype in MEDIA_MSGTYPES and isinstance(content.get("url"), str):
        att, text = _attachment(msgtype, content, body, field)
        attachments = (att,)
        html = None if not text else html
    elif msgtype == "m.emote":
        text = f"* {text}"
        html = f"* {html}" if html is not None else None

    return Message(id=message_id, author=Actor(sender), text=text, html=html, reply_to=reply_to, thread=thread,
                   warning=warning, mentions=_mentions(content, formatted, field), attachments=attachments)


def _relations(content: Mapping[str, Any], field: str) -> tuple[str | None, str | None]:
    """(reply_to, thread root). A thread's ``m.in_reply_to`` counts as a reply
    only when ``is_falling_back`` is false."""
    rel = content.get("m.relates_to")
    if not isinstance(rel, Mapping):
        return None, None
    in_reply = rel.get("m.in_reply_to")
    reply_to = in_reply.get("event_id") if isinstance(in_reply, Mapping) else None
    if reply_to is not None:
        reply_to = _id(in_reply, "event_id", f"{field}.m.relates_to.m.in_reply_to.event_id")
    if rel.get("rel_type") == "m.thread":
        root = _id(rel, "event_id", f"{field}.m.relates_to.event_id")
        if rel.get("is_falling_back", False) is not False or reply_to == root:
            reply_to = None
        return reply_to, root
    return reply_to, None


def strip_reply_fallback(body: str) -> str:
    """``body`` without a rich reply fallback: the leading ``> `` lines
    (starting ``> <@sender>``) and the blank line after them."""
    lines = body.split("\n")
    if not lines or not _FALLBACK_FIRST_LINE.match(lines[0]):
        return body
    i = 0
    while i < len(lines) and lines[i].startswith(">"):
        i += 1
    if i < len(lines) and lines[i] == "":
        i += 1
    return "\n".join(lines[i:])


def _spoiler(formatted: str) -> tuple[str | None, str, str]:
    """(warning, raw reason, html): the first spoiler's reason (or the generic
    warning when it names none), the reason as written, and the HTML, unwrapped
    when one spoiler span wraps all of it."""
    m = _SPOILER_OPEN.search(formatted)
    if not m:
        return None, "", formatted
    reason = next((g for g in m.groups() if g is not None), None)
    raw = _html.unescape(reason) if reason else ""
    warning = raw.strip()[:1024] or GENERIC_WARNING
    stripped = formatted.strip()
    if m.start() == formatted.index(stripped) and stripped.lower().endswith("</span>"):
        inner = stripped[m.end() - m.start():-len("</span>")]
        if _balanced_spans(inner):
            return warning, raw, inner
    return warning, raw, formatted


def _balanced_spans(html: str) -> bool:
    depth = 0
    for tag in _SPAN_TAG.finditer(html):
        depth += -1 if tag.group(1) else 1
        if depth < 0:
            return False
    return depth == 0


def plain_to_html(text: str) -> str:
    """Plain text as the HTML the encoder writes for it (escaped, newlines as ``<br>``)."""
    return _html.escape(text, quote=False).replace("\n", "<br>")


def _mentions(content: Mapping[str, Any], formatted: str | None, field: str) -> tuple[Actor, ...]:
    """``m.mentions.user_ids``; without ``m.mentions`` (older clients), the pills."""
    mentions = content.get("m.mentions")
    ids: list[str] = []
    if isinstance(mentions, Mapping):
        user_ids = mentions.get("user_ids", [])
        if not isinstance(user_ids, list) or not all(isinstance(u, str) for u in user_ids):
            raise MatrixDecodeError("must be a list of user ids", field=f"{field}.m.mentions.user_ids")
        ids = user_ids
    elif formatted:
        ids = [unquote(m.group(1)) for m in _PILL.finditer(formatted)]
    seen: dict[str, None] = {}
    for u in ids:
        if u.startswith("@") and ":" in u and _id_ok(u):
            seen.setdefault(u)
    return tuple(Actor(u) for u in list(seen)[:64])


def _attachment(msgtype: str, content: Mapping[str, Any], body: str, field: str) -> tuple[Attachment, str]:
    """The attachment and the message text (the caption, or nothing). Spec
    v1.10: with ``filename`` present and different, ``body`` is a caption;
    otherwise ``body`` is the file name."""
    url = content["url"]
    if not url.startswith("mxc://"):
        raise MatrixDecodeError("must be an mxc:// URI", field=f"{field}.url")
    info = content.get("info") if isinstance(content.get("info"), Mapping) else {}
    mimetype = info.get("mimetype")
    if not isinstance(mimetype, str) or len(mimetype) > 255 or not _MEDIA_TYPE.match(mimetype):
        mimetype = MEDIA_MSGTYPES[msgtype]
    size = info.get("size")
    size = size if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= SIZE_MAX else None
    filename = content.get("filename")
    filename = filename if isinstance(filename, str) and filename else None
    caption = body if filename is not None and body != filename else ""
    name = (filename or body or None)
    alt = (caption or body or None) if msgtype == "m.image" else None
    return Attachment(url=url, media_type=mimetype, alt=alt, name=name[:256] if name else None, size=size), caption


# -- redactions ---------------------------------------------------------------------------------

def _redaction(event: Mapping[str, Any], event_id: str, sender: str, content: Mapping[str, Any],
               redacted: Mapping[str, Any] | None) -> Item:
    target = content.get("redacts", event.get("redacts"))  # room v11+: in content; older: top level
    if not isinstance(target, str) or not target:
        raise MatrixDecodeError("a redaction names the event it removes", field="content.redacts")
    if not _id_ok(target):
        raise MatrixDecodeError("must hold no control characters and at most 255 bytes", field="content.redacts",
                                reason=BAD_ID)
    reason = content.get("reason")
    reason = reason[:1024] if isinstance(reason, str) and reason else None
    author = redacted.get("sender") if isinstance(redacted, Mapping) else None
    if isinstance(redacted, Mapping) and redacted.get("type") == "m.reaction":
        rel = (redacted.get("content") or {}).get("m.relates_to")
        if isinstance(rel, Mapping) and isinstance(rel.get("event_id"), str) and isinstance(rel.get("key"), str):
            return Item("civic.reaction.removed",
                        Reaction(message=rel["event_id"], author=Actor(author or sender), key=rel["key"]), event_id)
    if isinstance(author, str) and author != sender:
        return Item("civic.moderation.action",
                    ModerationAction(action="remove_message", message=target, member=Actor(author), by=Actor(sender),
                                     reason=reason), event_id)
    by = None if author == sender else Actor(sender)
    return Item("civic.message.deleted", MessageDeletion(id=target, by=by, reason=reason), event_id)


# -- memberships and roles ----------------------------------------------------------------------

def _membership(event: Mapping[str, Any], event_id: str, sender: str, content: Mapping[str, Any],
                unsigned: Mapping[str, Any], bot_user: str) -> Item | Ignored:
    member = _id(event, "state_key")
    if member == bot_user:
        return Ignored(BOT_MEMBERSHIP)
    membership = _str(content, "membership", "content.membership")
    prev = unsigned.get("prev_content")
    prev_membership = prev.get("membership") if isinstance(prev, Mapping) else None
    reason = content.get("reason")
    reason = reason[:1024] if isinstance(reason, str) and reason else None
    name = content.get("displayname")
    actor = Actor(member, name=name[:256]) if isinstance(name, str) and name else Actor(member)
    by = Actor(sender) if sender != member else None
    if membership == "join":
        if prev_membership == "join":
            return Ignored(PROFILE_CHANGE)
        m = Membership(member=actor, state="joined", reason=reason)
    elif membership == "leave":
        if prev_membership == "ban" and by is not None:
            m = Membership(member=actor, state="unbanned", by=by, reason=reason)
        elif prev_membership == "invite" and by is not None:  # an invite withdrawn, not a kick
            m = Membership(member=actor, state="left", by=by, reason=reason)
        elif by is not None:
            m = Membership(member=actor, state="kicked", by=by, reason=reason)
        else:
            m = Membership(member=actor, state="left", reason=reason)
    elif membership == "ban":
        m = Membership(member=actor, state="banned", by=by, reason=reason)
    elif membership == "invite":
        m = Membership(member=actor, state="invited", by=by, reason=reason)
    else:  # knock, or a future state
        return Ignored(STATE_NOT_CARRIED)
    return Item("civic.membership.changed", m, event_id)


def role_for_level(level: int) -> Role:
    """>= 100 admin, >= 50 moderator, else member."""
    if level >= 100:
        return "admin"
    if level >= 50:
        return "moderator"
    return "member"


def role_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Role]]:
    """(user id, new role) for every user listed in either content whose role
    differs between ``old`` and ``new``, sorted by user id. A change of
    ``users_default`` alone is not reported here (the codec does not know the
    room's members); room v12 creators are never listed, so never reported."""
    old_users, new_users = _levels(old, "users"), _levels(new, "users")
    old_default, new_default = _level(old.get("users_default")), _level(new.get("users_default"))
    out: list[tuple[str, Role]] = []
    for user in sorted(set(old_users) | set(new_users)):
        before = role_for_level(old_users.get(user, old_default))
        after = role_for_level(new_users.get(user, new_default))
        if before != after:
            out.append((user, after))
    return out


def _levels(content: Mapping[str, Any], key: str) -> dict[str, int]:
    users = content.get(key)
    if not isinstance(users, Mapping):
        return {}
    return {u: _level(v) for u, v in users.items() if isinstance(u, str) and _id_ok(u)}


def _level(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str):  # old rooms allowed numeric strings
        try:
            return int(value)
        except ValueError:
            return 0
    return 0


# -- policy rules -------------------------------------------------------------------------------

_POLICY_KINDS = {"m.policy.rule.user": "user", "m.policy.rule.server": "server"}


def decode_policy_rule(event: Mapping[str, Any]) -> PolicyRule | None:
    """A user or server rule from a policy list room; ``None`` for any other event
    (room rules included). A rule with empty content was withdrawn: it comes back
    with ``removed=True`` so the adapter can drop it by ``state_key``."""
    etype = event.get("type")
    kind = _POLICY_KINDS.get(etype) if isinstance(etype, str) else None
    if kind is None or "state_key" not in event:
        return None
    state_key = event.get("state_key")
    state_key = state_key if isinstance(state_key, str) else ""
    content = event.get("content")
    if not isinstance(content, Mapping):
        raise MatrixDecodeError("must be an object", field="content")
    if not content.get("entity") and not content.get("recommendation"):
        return PolicyRule(kind=kind, entity_glob="", recommendation="", state_key=state_key,  # type: ignore[arg-type]
                          removed=True)
    entity = _str(content, "entity", "content.entity")
    recommendation = _str(content, "recommendation", "content.recommendation")
    reason = content.get("reason")
    return PolicyRule(kind=kind, entity_glob=entity, recommendation=recommendation,  # type: ignore[arg-type]
                      reason=reason if isinstance(reason, str) and reason else None, state_key=state_key)


def glob_matches(glob: str, value: str) -> bool:
    """Whether ``value`` matches a policy ``glob`` (``*`` and ``?``, case-sensitive)."""
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
    return re.fullmatch(pattern, value, re.DOTALL) is not None


# -- helpers ------------------------------------------------------------------------------------

def _str(obj: Mapping[str, Any], key: str, field: str | None = None) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise MatrixDecodeError("must be a non-empty string", field=field or key)
    return value


def _id(obj: Mapping[str, Any], key: str, field: str | None = None) -> str:
    """A Matrix id (or state key naming a user): a non-empty string without
    control characters, at most ``ID_MAX`` bytes."""
    value = _str(obj, key, field)
    if not _id_ok(value):
        raise MatrixDecodeError("must hold no control characters and at most 255 bytes", field=field or key,
                                reason=BAD_ID)
    return value


def _id_ok(value: str) -> bool:
    return len(value) <= ID_MAX and len(value.encode("utf-8", "surrogatepass")) <= ID_MAX \
        and _CONTROL.search(value) is None


def _validate(item: Item) -> None:
    """Check the payload against the schema's limits (lengths, media types)."""
    problem = schema_problem(item.payload)
    if problem is not None:
        raise MatrixDecodeError(f"does not fit the common schema: {problem[0]}", field="content" + problem[1],
                                reason=SCHEMA_LIMIT)
