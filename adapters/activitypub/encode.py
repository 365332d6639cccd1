"""Gateway -> ActivityPub, pure: schema payloads to ActivityStreams 2.0
documents, and the gateway's own actor documents. No I/O.

Every id the gateway mints lives under ``Urls.base`` (the public base URL of
the platform): hosted groups ``/ap/groups/{name}``, the people of other
platforms ``/ap/people/{stand-in id}``, notes ``/ap/notes/{id}``, activities
``/ap/activities/{id}``, and the instance actor ``/ap/actor``.

Nothing here publishes a count: no ``likes``, ``shares`` or ``replies``
collections with totals, and collections of followers are not served with a
``totalItems`` (civic rule: no engagement counters).
"""

from __future__ import annotations

import html as _html
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

from msgspec import Struct

from schemas.v1 import Actor, Attachment, Message

AS_CONTEXT = "https://www.w3.org/ns/activitystreams"
SECURITY_CONTEXT = "https://w3id.org/security/v1"
CONTEXT: list[Any] = [AS_CONTEXT, SECURITY_CONTEXT,
                      {"sensitive": "as:sensitive", "Hashtag": "as:Hashtag", "toot": "http://joinmastodon.org/ns#",
                       "discoverable": "toot:discoverable", "indexable": "toot:indexable",
                       "manuallyApprovesFollowers": "as:manuallyApprovesFollowers",
                       "movedTo": {"@id": "as:movedTo", "@type": "@id"},
                       "alsoKnownAs": {"@id": "as:alsoKnownAs", "@type": "@id"},
                       "litepub": "http://litepub.social/ns#", "EmojiReact": "litepub:EmojiReact"}]
PUBLIC = "https://www.w3.org/ns/activitystreams#Public"
ACTIVITY_JSON = "application/activity+json"
ANONYMOUS_NAME = "anonymous member"
NAME_MAX = 400
"""Longest name or id in one of the gateway's URLs (a group name, a stand-in
id, a note or activity id) or in a WebFinger resource: with the prefix of the
store key it is kept under, it stays within the store's 512 characters."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

OwnKind = Literal["group", "person", "instance", "note", "activity"]
_OWN_KINDS: dict[str, OwnKind] = {"groups": "group", "people": "person", "notes": "note", "activities": "activity"}


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be a name or id of the gateway's (in a path or a
    WebFinger resource), or ``None`` when it can."""
    if not value:
        return "empty"
    if len(value) > NAME_MAX:
        return f"longer than {NAME_MAX} characters"
    if _CONTROL.search(value):
        return "control characters or undecodable bytes"
    return None


class Urls(Struct, frozen=True):
    """The ids the gateway mints, under one public base URL (no trailing ``/``)."""

    base: str

    @property
    def host(self) -> str:
        return self.base.split("://", 1)[1].split("/", 1)[0]

    @property
    def instance(self) -> str:
        return f"{self.base}/ap/actor"

    @property
    def shared_inbox(self) -> str:
        return f"{self.base}/ap/inbox"

    def group(self, name: str) -> str:
        return f"{self.base}/ap/groups/{quote(name, safe='')}"

    def person(self, stand_in: str) -> str:
        return f"{self.base}/ap/people/{quote(stand_in, safe='')}"

    def note(self, message_id: str) -> str:
        return f"{self.base}/ap/notes/{quote(message_id, safe='')}"

    def activity(self, event_id: str, suffix: str = "") -> str:
        return f"{self.base}/ap/activities/{quote(event_id, safe='')}{suffix}"

    def key_id(self, actor_url: str) -> str:
        return f"{actor_url}#main-key"

    def owns(self, url: str) -> bool:
        return url.startswith(self.base + "/")

    def own(self, url: str) -> tuple[OwnKind, str] | None:
        """What one of the gateway's own ids names (the reverse of ``group``,
        ``person``, ``instance``, ``note``, ``activity``): ``("group", name)``,
        ``("person", stand-in id)``, ``("instance", "")``, ``("note", message
        id)``, ``("activity", event id)``. ``None`` for any other URL: another
        server's, a path the gateway mints no id at, or a value no name can be
        (``name_problem``). Scheme and host compare without case; an actor id
        has no query or fragment (an activity's may have a fragment)."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "HTTP://", "HTTPS://")):
            return None
        try:
            parts, mine = urlsplit(url), urlsplit(self.base)
        except ValueError:
            return None
        if (parts.scheme.lower(), parts.netloc.lower()) != (mine.scheme.lower(), mine.netloc.lower()) or parts.query:
            return None
        if parts.path == "/ap/actor":
            return None if parts.fragment else ("instance", "")
        segments = parts.path.split("/")
        if len(segments) != 4 or segments[:2] != ["", "ap"] or segments[2] not in _OWN_KINDS:
            return None
        kind = _OWN_KINDS[segments[2]]
        if parts.fragment and kind != "activity":
            return None
        value = unquote(segments[3], errors="surrogateescape")  # undecodable bytes: a name_problem
        return None if name_problem(value) else (kind, value)


def person_url(urls: Urls, actor: Actor) -> str:
    """The actor id for ``actor`` as the fediverse sees them: their own account
    when the core names one (an actor URL), else the gateway's Person for them."""
    if actor.id.startswith(("https://", "http://")):
        return actor.id
    return urls.person(actor.id)


def display_name(actor: Actor) -> str:
    """As the identity level allows: anonymous people get a neutral label."""
    if actor.identity == "anonymous":
        return ANONYMOUS_NAME
    return (actor.name or actor.id)[:256]


def plain_to_html(text: str) -> str:
    paragraphs = [p for p in text.split("\n\n")]
    return "".join(f"<p>{_html.escape(p, quote=False).replace(chr(10), '<br>')}</p>" for p in paragraphs if p) \
        or "<p></p>"


# -- actors -------------------------------------------------------------------------------------------

def _actor(kind: str, actor_id: str, username: str, name: str, urls: Urls, key_pem: str,
           summary: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "@context": CONTEXT,
        "id": actor_id,
        "type": kind,
        "preferredUsername": username,
        "name": name,
        "inbox": f"{actor_id}/inbox",
        "outbox": f"{actor_id}/outbox",
        "followers": f"{actor_id}/followers",
        "following": f"{actor_id}/following",
        "endpoints": {"sharedInbox": urls.shared_inbox},
        "url": actor_id,
        "manuallyApprovesFollowers": False,
        "discoverable": False,
        "indexable": False,
        "publicKey": {"id": urls.key_id(actor_id), "owner": actor_id, "publicKeyPem": key_pem},
    }
    if summary:
        doc["summary"] = summary
    return doc


def group_actor(urls: Urls, name: str, key_pem: str, *, display: str | None = None,
                summary: str | None = None) -> dict[str, Any]:
    """A hosted group (FEP-1b12): follow it to join, address it to post."""
    doc = _actor("Group", urls.group(name), name, display or name, urls, key_pem, summary)
    doc["postingRestrictedToMods"] = False
    return doc


def person_actor(urls: Urls, actor: Actor, key_pem: str) -> dict[str, Any]:
    """A person of another platform, shown as their identity level allows; the
    username is their stand-in id (never a handle for anonymous people: theirs
    differs per group already)."""
    return _actor("Person", urls.person(actor.id), actor.id, display_name(actor), urls, key_pem)


def instance_actor(urls: Urls, key_pem: str) -> dict[str, Any]:
    """The gateway itself (FEP-d556): signs fetches and forwards reports."""
    return _actor("Application", urls.instance, urls.host, "civic-gateway", urls, key_pem)


def webfinger(resource: str, actor_id: str) -> dict[str, Any]:
    return {"subject": resource, "aliases": [actor_id],
            "links": [{"rel": "self", "type": ACTIVITY_JSON, "href": actor_id}]}


def nodeinfo(version: str, *, open_registrations: bool = False) -> dict[str, Any]:
    """NodeInfo 2.1, without usage counts (no engagement figures)."""
    return {"version": "2.1", "software": {"name": "civic-gateway", "version": version,
                                           "homepage": "https://civic-gateway.example/"},
            "protocols": ["activitypub"], "services": {"inbound": [], "outbound": []},
            "openRegistrations": open_registrations, "usage": {"users": {}}, "metadata": {}}


def collection(collection_id: str, items: Sequence[Any] = ()) -> dict[str, Any]:
    """An ordered collection, without ``totalItems``."""
    return {"@context": AS_CONTEXT, "id": collection_id, "type": "OrderedCollection", "orderedItems": list(items)}


# -- objects and activities -----------------------------------------------------------------------

def note(urls: Urls, msg: Message, *, group_id: str, published: str, reply_to: str | None = None,
         mention_names: Mapping[str, str] | None = None, followers: str | None = None,
         updated: str | None = None) -> dict[str, Any]:
    """A ``Note`` (``Page`` when the message has a title) posted to ``group_id``:
    public, addressed to the group, ``audience`` the group (FEP-1b12)."""
    author = person_url(urls, msg.author)
    content = msg.html if msg.html and msg.html.strip() else plain_to_html(msg.text)
    obj: dict[str, Any] = {
        "id": urls.note(msg.id),
        "type": "Page" if msg.title else "Note",
        "attributedTo": author,
        "content": content,
        "published": published,
        "to": [PUBLIC, group_id],
        "cc": [followers] if followers else [],
        "audience": group_id,
        "url": urls.note(msg.id),
    }
    if msg.title:
        obj["name"] = msg.title
    if msg.language:
        obj["contentMap"] = {msg.language: content}
    if msg.warning or msg.sensitive:
        obj["sensitive"] = True
        if msg.warning:
            obj["summary"] = msg.warning
    if reply_to:
        obj["inReplyTo"] = reply_to
    tags = []
    for m in msg.mentions:
        href = person_url(urls, m)
        name = (mention_names or {}).get(href) or display_name(m)
        tags.append({"type": "Mention", "href": href, "name": f"@{name}"})
        obj["cc"].append(href)
    if tags:
        obj["tag"] = tags
    if msg.attachments:
        obj["attachment"] = [attachment(a) for a in msg.attachments]
    if updated:
        obj["updated"] = updated
    return obj


def attachment(a: Attachment) -> dict[str, Any]:
    image = a.media_type.startswith("image/")
    doc: dict[str, Any] = {"type": "Image" if image else "Document", "mediaType": a.media_type, "url": a.url}
    name = a.alt if image else a.name
    if name:
        doc["name"] = name
    return doc


def activity(kind: str, activity_id: str, actor: str, obj: Any, *, to: Sequence[str] = (),
             cc: Sequence[str] = (), context: bool = True, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"@context": CONTEXT} if context else {}
    doc.update({"id": activity_id, "type": kind, "actor": actor, "object": obj})
    if to:
        doc["to"] = list(to)
    if cc:
        doc["cc"] = list(cc)
    doc.update(extra)
    return doc


def tombstone(object_id: str, former_type: str = "Note") -> dict[str, Any]:
    return {"id": object_id, "type": "Tombstone", "formerType": former_type}


def announce(urls: Urls, group_name: str, inner: Mapping[str, Any], announce_id: str) -> dict[str, Any]:
    """The group shares an activity with its followers (FEP-1b12): the inner
    activity embedded (without its own ``@context``)."""
    group = urls.group(group_name)
    body = {k: v for k, v in inner.items() if k != "@context"}
    return activity("Announce", announce_id, group, body, to=[PUBLIC], cc=[f"{group}/followers"], audience=group)


# -- what crosses (checked by the contract suite, tests/test_adapter_contract.py) --------------------

CARRIES = frozenset({"civic.message.created", "civic.message.edited", "civic.message.deleted",
                     "civic.reaction.added", "civic.reaction.removed", "civic.membership.changed",
                     "civic.moderation.action", "civic.report.filed"})
"""Event types a hosted group shares with its followers (a report: a Flag to
the reported person's server) that read back as the same type. Not carried:
``civic.profile.updated`` (an Update of the gateway's Person document, not an
event of the group), ``civic.account.moved`` (the core shows the person by
their new account)."""
_WARNED = "a content warning (summary) marks the post sensitive, as Mastodon does"
_BY_GROUP = "the group acts (its Block or Delete), not the moderator: the fediverse sees no moderator accounts"
DEGRADATIONS: dict[str, dict[str, str]] = {
    "civic.message.created": {"sensitive": _WARNED},
    "civic.message.edited": {"sensitive": _WARNED, "html": "a post's content is HTML: plain text arrives as paragraphs"},
    "civic.membership.changed": {"by": _BY_GROUP},
    "civic.moderation.action": {"by": _BY_GROUP},
    "civic.report.filed": {
        "category": "a Flag has no category: it leads the Flag's content and reads back as \"other\"",
        "text": "the category leads it (\"spam: ...\")",
        "reporter": "the gateway's instance actor sends the Flag; the reporter stays unnamed",
    },
}
"""Fields of a payload that come back changed after a trip through the fediverse."""
