"""Deliveries to fediverse inboxes, on the gateway's own outbox (pure: no I/O).

The core hands the adapter one group's events in order; a hosted group then
has followers on many servers, and one server that is down must neither hold
up the others nor the group's queue. So ``deliver`` sends nothing itself for
a hosted group: it returns one ``Followup`` per follower inbox, and the core
queues each in the target group ``inbox:<host>`` of that inbox's server, in
the same transaction that records the group's event as delivered. Each inbox
host is then an ordinary ordered queue of the core (``gateway.delivery``):

* one POST in flight per host, in order; hosts proceed independently;
* signed POST (the adapter's ``_post``), ``2xx`` done;
* ``4xx`` other than 401, 408 and 429 is not retried (Mastodon's
  "unsalvageable"): the delivery goes to the dead letters at once;
* anything else is retried on Mastodon's schedule (``gateway.retry.MASTODON``,
  the adapter's ``RETRY``) until ``retry_max_age``, then dead-lettered;
* the wait between attempts is per host: it is the circuit breaker (a server
  that is down gets one request per step of the schedule);
* in a cluster each host's queue is delivered by the node that owns it (the
  partition leases of the target groups), like every target group.

This module names the targets and encodes what each follow-up carries.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

import msgspec

from gateway.kit import EventId, Followup, GroupId

POST = "activitypub.post"
"""The follow-up type of one signed POST to one inbox."""
INBOX_PREFIX = "inbox:"
"""Target groups ``inbox:<host>`` (``host[:port]``, lower case): one queue per server."""


class Post(msgspec.Struct, frozen=True, array_like=True):
    """One activity for one inbox, as queued (``Followup.body``)."""

    inbox: str
    actor: str
    """Who signs it (an actor id of the gateway's)."""
    body: bytes
    """The activity, JSON, exactly as it is posted."""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Post).decode


def host_of(url: str) -> str:
    """The host (and port) of ``url``, lower case; ``""`` when it has none or does not parse."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return ""


def target_of(inbox: str) -> GroupId:
    """The target group that queues deliveries to ``inbox``: its server's."""
    return GroupId(INBOX_PREFIX + host_of(inbox))


def followup(key: str, post: Post) -> Followup:
    """The follow-up that posts ``post``. ``key`` names what it delivers (the
    event id it came from, or the activity id): the same key and inbox give
    the same event id, so a follow-up asked for again is recognisably the same."""
    digest = hashlib.sha256(f"{key}\x00{post.inbox}".encode()).hexdigest()[:32]
    return Followup(group=target_of(post.inbox), event_id=EventId(f"ap-post:{digest}"), type=POST,
                    body=_encode(post))


def posts_for(key: str, inboxes: list[str], actor: str, body: bytes) -> list[Followup]:
    """One follow-up per inbox (duplicates and inboxes without a host left out), in order."""
    seen: set[str] = set()
    out = []
    for inbox in inboxes:
        if inbox in seen or not host_of(inbox):
            continue
        seen.add(inbox)
        out.append(followup(key, Post(inbox=inbox, actor=actor, body=body)))
    return out


def decode_post(raw: bytes) -> Post:
    """A queued ``Post`` (``msgspec.DecodeError`` when it is not one)."""
    return _decode(raw)
