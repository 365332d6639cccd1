"""The records the store keeps and hands out (``OutboxItem``, ``DeadLetter``,
``Mapping``, ``ModerationEntry``, ``ClusterView``), the adapter-state key rules
(``check_state_key``, ``prefix_end``) and the schema-version guard
(``refuse_newer_schema``). Imported through ``gateway.store.base``."""

from __future__ import annotations

import collections.abc
import sys
from collections.abc import Sequence
from typing import Any

import msgspec
from msgspec import Struct

from gateway.errors import GatewayError
from gateway.ids import CanonicalId, EventId, GroupId, GroupRef, LinkName, NativeId, PlatformName
from schemas.v1 import EVENT_TYPES

_encode_body = msgspec.msgpack.Encoder().encode


class SchemaTooNew(GatewayError):
    """The database holds a migration this code does not ship: a newer
    civic-gateway wrote it, and this one must not read or change it."""


def refuse_newer_schema(applied: collections.abc.Iterable[int], known: Sequence[tuple[int, str]]) -> None:
    """Called by each backend's migration step, before it applies anything:
    raise ``SchemaTooNew`` if ``applied`` (the database's migration numbers)
    has one above the highest of ``known`` (the migrations shipped here).
    An older gateway would otherwise run on tables it does not understand
    (and a later upgrade would find them changed behind its back)."""
    newest = max(applied, default=0)
    knows = max((v for v, _ in known), default=0)
    if newest > knows:
        raise SchemaTooNew(f"this database was written by a newer civic-gateway (schema {newest}, this version "
                           f"knows up to {knows}): upgrade civic-gateway or restore a backup")


def encode_payload(payload: object) -> bytes:
    """The outbox body of a schema payload (msgpack); ``OutboxItem.payload`` reads it back."""
    return _encode_body(payload)


class OutboxItem(Struct, frozen=True, gc=False):
    """One event waiting for one target group."""

    seq: int
    target: GroupRef
    event_id: EventId
    type: str
    origin: PlatformName
    created: float
    pending: str | None
    """Canonical message ids to translate at delivery time (their target id
    may only be known once earlier deliveries finish), in the storage form of
    ``gateway.idmap.encode_pending``, which also reads it back."""
    body: bytes
    """The payload, msgpack, ids already in the target's terms where known."""
    occurred: float | None = None
    """When the event happened at its origin (None: as ``created``)."""
    decoded: Any = None
    """The payload object ``body`` was encoded from, on items the pipeline of
    this process made (never stored): delivery takes it instead of decoding
    what was just encoded. None on items read from the store."""

    def payload(self) -> Any:
        """The payload in its schema type (``schemas.v1.EVENT_TYPES[type]``):
        ``decoded`` where this process made the item, else the body decoded;
        for an adapter's own follow-up (``gateway.adapter.Followup``, a type
        that is no schema event type), the body as it is (bytes)."""
        if self.decoded is not None:
            return self.decoded
        decoder = _body_decoders.get(self.type)
        return self.body if decoder is None else decoder.decode(self.body)


_body_decoders = {t: msgspec.msgpack.Decoder(cls) for t, cls in EVENT_TYPES.items()}


class DeadLetter(Struct, frozen=True):
    item: OutboxItem
    error: str
    attempts: int
    failed_at: float


class Mapping(Struct, frozen=True, gc=False):
    """A native id a delivery created: (platform, grp, kind, native) -> canonical."""

    platform: PlatformName
    grp: GroupId
    kind: str
    native: NativeId
    canonical: CanonicalId


class ModerationEntry(Struct, frozen=True):
    """One row of the public moderation log, as stored. It keeps no name that
    the person's identity level does not allow; ``gateway.transparency.public``
    is what the world sees of it."""

    time: float
    link: LinkName
    platform: PlatformName
    grp: GroupId
    action: str
    subject: str
    moderator: str | None
    reason: str | None
    category: str | None
    event_id: EventId
    seq: int = 0
    subject_identity: str | None = None
    """The identity level of the member acted on (None: a message alone, or a
    row from before migration 0007); ``gateway.transparency`` shows them by it."""
    subject_name: str | None = None
    """Their name, kept only when their level lets the log show it."""
    moderator_identity: str | None = None
    """The moderator's level; ``moderator`` holds their name only when identified."""


STATE_KEY_MAX = 512
"""Longest adapter state key, in characters (an index entry PostgreSQL can always take)."""


def check_state_key(key: str) -> str:
    """``key`` if it can be an adapter state key; ``ValueError`` saying why not.
    Keys are text up to ``STATE_KEY_MAX`` characters without NUL (which
    PostgreSQL text cannot hold), the same on every store."""
    if not isinstance(key, str):
        raise ValueError(f"adapter state key {key!r}: must be a string")
    if len(key) > STATE_KEY_MAX:
        raise ValueError(f"adapter state key {key[:40]!r}...: longer than {STATE_KEY_MAX} characters")
    if "\x00" in key:
        raise ValueError(f"adapter state key {key!r}: contains NUL")
    return key


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (in code
    point order), so that a prefix scan is the index range ``[prefix, end)``;
    None when there is none (the empty prefix, or only the highest code points)."""
    chars = list(prefix)
    while chars:
        nxt = ord(chars.pop()) + 1
        if 0xD800 <= nxt <= 0xDFFF:  # surrogates are no text either store can hold
            nxt = 0xE000
        if nxt <= sys.maxunicode:
            return "".join(chars) + chr(nxt)
    return None


class ClusterView(Struct, frozen=True):
    """What one ``Store.cluster_tick`` found: the partitions this node owns now."""

    owned: frozenset[int]
    nodes: tuple[str, ...]
    """The live nodes (seen within the lease ttl), sorted."""
    epoch: float
    """The database's clock at the tick (seconds since the epoch); leases run from it."""

