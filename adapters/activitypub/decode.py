"""ActivityPub -> gateway, pure: one activity (JSON, already verified by the
inbox) to schema payloads with the fediverse's own ids. No I/O.

Ids stay native: a message is its object id (a URL), a person their actor id
(a URL), the group the link's group value (a hosted group's name, or the
remote group's actor id). The core swaps them for canonical ids.

Values may be a single item or a list wherever ActivityStreams allows a list
(Fedify compacts one-element lists to the item), and objects may be embedded
or named by id; ``as_list`` and ``id_of`` take both.

What the pure codec cannot know, the adapter passes in:

* ``undone``: the activity an ``Undo`` names only by id (a ``Like`` the
  adapter remembered), so the undo can say what it undoes;
* ``author_of``: who wrote the object a ``Delete`` or ``Remove`` names (the
  adapter knows the messages it took in), so a removal by someone else is a
  moderation action rather than a deletion;
* ``moved_to_alias``: for a ``Move``, whether the target actor lists the old
  one in ``alsoKnownAs`` (the adapter fetched it); without it the move is refused.

Two more pure steps around decoding: ``id_problem`` (before: every id the
activity names is a well-formed http(s) URL of sane length, so nothing later
meets a NUL or a URL no layer reads alike) and ``with_actors`` (after: the
gateway's own actor URLs in the payloads, found by ``actor_ids``, replaced by
the people they stand for, which the adapter looked up).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgspec

from gateway.kit import BadURL, DecodeError, Decoded, Ignored, Item, html_to_text, parse_url, schema_problem
from schemas.v1 import (
    AccountMove,
    AccountRef,
    Actor,
    Attachment,
    Membership,
    Message,
    MessageDeletion,
    ModerationAction,
    ProfileUpdate,
    Reaction,
    Report,
)

PUBLIC = "https://www.w3.org/ns/activitystreams#Public"
NOTE_TYPES = frozenset({"Note", "Page", "Article", "Question"})
LIKE_KEY = "👍"
"""The reaction a ``Like`` is (Mastodon's favourite, Lemmy's upvote)."""

# Ignored.reason codes
UNSUPPORTED = "unsupported_type"
BOOST = "boost"                  # an Announce by a person: a boost is an engagement signal, not carried
NOT_PUBLIC = "not_public"        # direct and followers-only posts stay where they are
UNKNOWN_UNDO = "unknown_undo"    # an Undo of something the gateway never took in
MOVE_UNPROVEN = "move_unproven"  # a Move whose target does not name the old account


class APDecodeError(DecodeError):
    """An activity the gateway cannot read; ``field`` names where."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(f"`{field}`: {message}", field=field)


# -- helpers for ActivityStreams' loose shapes ----------------------------------------------------

def as_list(value: Any) -> list[Any]:
    """A value that may be one item, a list, or absent, as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def id_of(value: Any) -> str | None:
    """The id of an embedded object or a link, or the value itself when it is an id."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        v = value.get("id") or value.get("href")
        return v if isinstance(v, str) and v else None
    return None


def type_of(value: Any) -> str | None:
    """The type name; a full IRI of an extension type (``http://litepub.social/ns#EmojiReact``,
    as Fedify writes it inside an Announce) is shortened to its name."""
    t = value.get("type") if isinstance(value, Mapping) else None
    if isinstance(t, list):
        t = next((x for x in t if isinstance(x, str)), None)
    if isinstance(t, str) and t.startswith(("http://", "https://")) and "#" in t:
        t = t.rsplit("#", 1)[1]
    return t if isinstance(t, str) else None


def audience(activity: Mapping[str, Any], obj: Mapping[str, Any] | None = None) -> set[str]:
    """Every id the activity (and its object) is addressed to."""
    out: set[str] = set()
    for source in (activity, obj or {}):
        for key in ("to", "cc", "audience", "bto", "bcc"):
            out.update(i for i in (id_of(v) for v in as_list(source.get(key))) if i)
    return out


def is_public(activity: Mapping[str, Any], obj: Mapping[str, Any] | None = None) -> bool:
    to = audience(activity, obj)
    return bool(to & {PUBLIC, "as:Public", "Public"})


def _str(obj: Mapping[str, Any], key: str, field: str | None = None) -> str:
    value = id_of(obj.get(key))
    if value is None:
        raise APDecodeError("must be an id (a non-empty string or an object with one)", field=field or key)
    return value


# -- ids --------------------------------------------------------------------------------------------

ID_MAX = 400
"""Longest id (a URL) an activity may name: with the prefix of the store key
the adapter keeps it under, it stays within the store's 512 characters (real
servers' ids are far shorter)."""
ID_FIELDS = ("id", "actor", "object", "target", "attributedTo", "inReplyTo", "to", "cc", "bto", "bcc", "audience")
PUBLIC_FORMS = frozenset({PUBLIC, "as:Public", "Public"})


def id_problem(activity: Mapping[str, Any]) -> str | None:
    """Why an id the activity (or an object embedded in it, to three levels)
    names is not a well-formed http(s) URL of at most ``ID_MAX`` characters
    (the kit's ``parse_url``), as "`field`: reason"; ``None`` if every
    one is. Ids of ``Mention`` tags are checked too."""
    for field, value in _ids_in(activity, "", 3):
        addressing = field.rsplit(".", 1)[-1] in ("to", "cc", "bto", "bcc", "audience")
        if addressing and isinstance(value, str) and value in PUBLIC_FORMS:
            continue
        try:
            parse_url(value, max_length=ID_MAX)
        except BadURL as exc:
            return f"`{field}`: {exc}"
    return None


def _ids_in(doc: Mapping[str, Any], path: str, depth: int) -> Iterator[tuple[str, Any]]:
    """(field, value) of each id in ``doc``; embedded objects are looked into
    ``depth`` levels deep (below that, only their own id)."""
    for key in ID_FIELDS:
        for value in as_list(doc.get(key)):
            if not isinstance(value, Mapping) or key == "id":
                yield f"{path}{key}", value  # anything but a string is "not a URL"
            elif depth > 1:
                yield from _ids_in(value, f"{path}{key}.", depth - 1)
            elif (inner := value.get("id") or value.get("href")) is not None:
                yield f"{path}{key}.id", inner
    for tag in as_list(doc.get("tag")):
        if isinstance(tag, Mapping) and type_of(tag) == "Mention":
            yield f"{path}tag.href", tag.get("href") or tag.get("id")


def actor_ids(payload: Any) -> set[str]:
    """Every id of a person (``Actor``) or account (``AccountRef``) in a payload."""
    out: set[str] = set()
    for field in msgspec.structs.fields(type(payload)):
        value = getattr(payload, field.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, (Actor, AccountRef)):
                out.add(v.id)
    return out


def with_actors(payload: Any, found: Mapping[str, Actor | None], platform: str) -> Any | None:
    """``payload`` with the ids in ``found`` (the gateway's own actor URLs)
    replaced in every field that names a person: by the person they stand for,
    or, for ``None`` (a group, the instance actor, an id the gateway never
    gave anyone), taken out: dropped from a list, an optional field emptied.
    ``None`` when a required field would be empty (the item names nobody).
    Accounts (``AccountRef``) are replaced only on ``platform`` (the ids are
    its own)."""
    changes: dict[str, Any] = {}
    for field in msgspec.structs.fields(type(payload)):
        value = getattr(payload, field.name)
        if isinstance(value, tuple):
            kept = tuple(r for r in (_replaced(v, found, platform) for v in value) if r is not None)
            if kept != value:
                changes[field.name] = kept
            continue
        new = _replaced(value, found, platform)
        if new is value:
            continue
        if new is None and field.required:
            return None
        changes[field.name] = new
    return msgspec.structs.replace(payload, **changes) if changes else payload


def _replaced(value: Any, found: Mapping[str, Actor | None], platform: str) -> Any:
    if isinstance(value, Actor) and value.id in found:
        return found[value.id]
    if isinstance(value, AccountRef) and value.platform == platform and value.id in found:
        who = found[value.id]
        return AccountRef(platform=platform, id=who.id) if who is not None else None
    return value


# -- entry point ------------------------------------------------------------------------------------

def decode_activity(activity: Mapping[str, Any], *, platform: str, undone: Mapping[str, Any] | None = None,
                    author_of: str | None = None, moved_to_alias: bool | None = None,
                    require_public: bool = True) -> Decoded | Ignored:
    """The schema meaning of one activity (see the module docstring)."""
    if not isinstance(activity, Mapping):
        raise APDecodeError("an activity is a JSON object", field="$")
    kind = type_of(activity)
    if kind is None:
        raise APDecodeError("missing", field="type")
    activity_id = _str(activity, "id")
    actor = _str(activity, "actor")
    obj = activity.get("object")
    items: list[Item]

    if kind in ("Create", "Update"):
        if not isinstance(obj, Mapping) or type_of(obj) not in NOTE_TYPES:
            return Ignored(UNSUPPORTED)
        if require_public and not is_public(activity, obj) and not _addressed_to_group(activity, obj):
            return Ignored(NOT_PUBLIC)
        msg = message_from_object(obj, actor)
        items = [Item("civic.message.created" if kind == "Create" else "civic.message.edited", msg, activity_id)]
    elif kind == "Delete":
        target = _str(activity, "object")
        if author_of is not None and author_of != actor:
            items = [Item("civic.moderation.action", ModerationAction(
                action="remove_message", message=target, member=Actor(author_of), by=Actor(actor),
                reason=_summary(activity)), activity_id)]
        elif target == actor:  # an account deleting itself: not a message
            return Ignored(UNSUPPORTED)
        else:
            items = [Item("civic.message.deleted", MessageDeletion(id=target), activity_id)]
    elif kind == "Remove":  # a moderator taking a post out of a group (Lemmy, FEP-1b12)
        target = _str(activity, "object")
        items = [Item("civic.moderation.action", ModerationAction(
            action="remove_message", message=target, member=Actor(author_of) if author_of else None,
            by=Actor(actor), reason=_summary(activity)), activity_id)]
    elif kind in ("Like", "EmojiReact"):
        items = [Item("civic.reaction.added", Reaction(message=_str(activity, "object"), author=Actor(actor),
                                                       key=_reaction_key(activity)), activity_id)]
    elif kind == "Follow":
        items = [Item("civic.membership.changed", Membership(member=Actor(actor), state="joined"), activity_id)]
    elif kind == "Block":
        member = _str(activity, "object")
        items = [Item("civic.membership.changed", Membership(member=Actor(member), state="banned", by=Actor(actor),
                                                             reason=_summary(activity)), activity_id)]
    elif kind == "Undo":
        return _undo(activity, activity_id, actor, obj if isinstance(obj, Mapping) else undone)
    elif kind == "Flag":
        return _flag(activity, activity_id, actor)
    elif kind == "Move":
        return _move(activity, activity_id, actor, platform, moved_to_alias)
    elif kind == "Announce":
        return Ignored(BOOST)
    else:
        return Ignored(UNSUPPORTED)
    for item in items:
        _validate(item)
    return Decoded(items=tuple(items))


def _addressed_to_group(activity: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    """A group post addressed to the group only (Lemmy, FEP-1b12) counts as public
    when it names an ``audience``: the group shares it with its members."""
    return bool(as_list(activity.get("audience")) or as_list(obj.get("audience")))


def _summary(activity: Mapping[str, Any]) -> str | None:
    s = activity.get("summary") or activity.get("content")
    return html_to_text(s)[:1024] or None if isinstance(s, str) else None


def _reaction_key(activity: Mapping[str, Any]) -> str:
    content = activity.get("content") or activity.get("_misskey_reaction")
    if isinstance(content, str) and content.strip() and type_of(activity) == "EmojiReact":
        return content.strip()[:64]
    if isinstance(content, str) and content.strip() and not content.strip().startswith(":"):
        return content.strip()[:64]  # Misskey sends its reaction in a Like's content
    return LIKE_KEY


# -- messages ---------------------------------------------------------------------------------------

def message_from_object(obj: Mapping[str, Any], actor: str) -> Message:
    """A ``Message`` from a ``Note``/``Page``/``Article``: HTML content (and its
    text), ``name`` as the title of a Page, ``summary`` as the content warning,
    ``inReplyTo``, Mention tags, attachments with alt text, the language of
    ``contentMap``."""
    oid = _str(obj, "id", "object.id")
    author = id_of(obj.get("attributedTo")) or actor
    if author != actor:
        raise APDecodeError(f"{author!r} is not the activity's actor {actor!r}", field="object.attributedTo")
    content = obj.get("content")
    language = None
    content_map = obj.get("contentMap")
    if isinstance(content_map, Mapping) and content_map:
        language, mapped = next(iter(content_map.items()))
        if not isinstance(content, str):
            content = mapped
    if content is not None and not isinstance(content, str):
        raise APDecodeError("must be a string of HTML", field="object.content")
    html = content or ""
    text = html_to_text(html) if html else ""
    summary = obj.get("summary")
    warning = html_to_text(summary)[:1024] if isinstance(summary, str) and summary.strip() else None
    sensitive = obj.get("sensitive") is True
    title = obj.get("name") if type_of(obj) in ("Page", "Article") and isinstance(obj.get("name"), str) else None
    reply_to = id_of(obj.get("inReplyTo"))
    mentions = tuple(Actor(h) for h in dict.fromkeys(
        id_of(t) for t in as_list(obj.get("tag")) if type_of(t) == "Mention" and id_of(t))
        if h)[:64]
    attachments = tuple(a for a in (_attachment(x) for x in as_list(obj.get("attachment"))) if a)[:32]
    return Message(id=oid, author=Actor(actor), text=text, html=html or None, title=title[:256] if title else None,
                   reply_to=reply_to, warning=warning, sensitive=sensitive or warning is not None,
                   mentions=mentions, attachments=attachments,
                   language=language if isinstance(language, str) and 2 <= len(language) <= 35 else None)


def _attachment(value: Any) -> Attachment | None:
    if not isinstance(value, Mapping):
        return None
    url = value.get("url")
    url = id_of(url[0]) if isinstance(url, list) and url else id_of(url) if not isinstance(url, str) else url
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        return None
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or "/" not in media_type:
        media_type = "image/jpeg" if type_of(value) == "Image" else "application/octet-stream"
    name = value.get("name")
    name = name if isinstance(name, str) and name else None
    image = media_type.startswith("image/")
    return Attachment(url=url, media_type=media_type, alt=name if image else None,
                      name=None if image else (name[:256] if name else None))


# -- undo, flag, move -------------------------------------------------------------------------------

def _undo(activity: Mapping[str, Any], activity_id: str, actor: str,
          inner: Mapping[str, Any] | None) -> Decoded | Ignored:
    if inner is None:
        return Ignored(UNKNOWN_UNDO)
    kind = type_of(inner)
    inner_actor = id_of(inner.get("actor")) or actor
    if inner_actor != actor:
        raise APDecodeError("an Undo undoes its own actor's activity", field="object.actor")
    if kind in ("Like", "EmojiReact"):
        item = Item("civic.reaction.removed", Reaction(message=_str(inner, "object", "object.object"),
                                                       author=Actor(actor), key=_reaction_key(inner)), activity_id)
    elif kind == "Follow":
        item = Item("civic.membership.changed", Membership(member=Actor(actor), state="left"), activity_id)
    elif kind == "Block":
        item = Item("civic.membership.changed", Membership(
            member=Actor(_str(inner, "object", "object.object")), state="unbanned", by=Actor(actor)), activity_id)
    elif kind == "Announce":
        return Ignored(BOOST)
    else:
        return Ignored(UNSUPPORTED)
    _validate(item)
    return Decoded(items=(item,))


def _flag(activity: Mapping[str, Any], activity_id: str, actor: str) -> Decoded:
    """A report: ``object`` lists the reported account and/or posts. The
    reporter is the sending server's instance actor (Mastodon), or a person;
    it is passed on, and the core shows it only as their identity level allows."""
    objects = [i for i in (id_of(o) for o in as_list(activity.get("object"))) if i]
    if not objects:
        raise APDecodeError("a Flag names what it reports", field="object")
    content = activity.get("content")
    text = html_to_text(content)[:65536] if isinstance(content, str) and content else None
    # Mastodon lists the account first, then its posts; a post id usually has a path below the account's.
    account = objects[0] if len(objects) > 1 or "/statuses/" not in objects[0] else None
    posts = [o for o in objects if o != account]
    item = Item("civic.report.filed", Report(category="other", message=posts[0] if posts else None,
                                             member=Actor(account) if account else None, text=text,
                                             reporter=Actor(actor, identity="anonymous")), activity_id)
    _validate(item)
    return Decoded(items=(item,))


def _move(activity: Mapping[str, Any], activity_id: str, actor: str, platform: str,
          moved_to_alias: bool | None) -> Decoded | Ignored:
    old = _str(activity, "object")
    target = _str(activity, "target")
    if old != actor:
        raise APDecodeError("an account moves itself only", field="object")
    if not moved_to_alias:
        return Ignored(MOVE_UNPROVEN)
    # The new account's half first (it names the old one), then the move itself.
    items = (
        Item("civic.profile.updated", ProfileUpdate(actor=Actor(target), also_known_as=(
            AccountRef(platform=platform, id=old),)), activity_id + "|aka"),
        Item("civic.account.moved", AccountMove(actor=Actor(old), target=AccountRef(platform=platform, id=target)),
             activity_id),
    )
    for item in items:
        _validate(item)
    return Decoded(items=items)


def _validate(item: Item) -> None:
    problem = schema_problem(item.payload)
    if problem is not None:
        raise APDecodeError(f"does not fit the common schema: {problem[0]}", field="object" + problem[1])


__all__: Sequence[str] = ["decode_activity", "message_from_object", "as_list", "id_of", "type_of", "audience",
                          "is_public", "Decoded", "Ignored", "Item", "APDecodeError", "LIKE_KEY", "PUBLIC",
                          "id_problem", "actor_ids", "with_actors", "ID_MAX"]
