"""The adapter interface: what a platform adapter implements and what the core
gives it.

An adapter translates formats and moves bytes; the core owns routing, id
translation, durability and retries. Inbound, an adapter decodes native events
into ``Inbound`` records (payloads from ``schemas`` with the platform's own
ids) and hands them to ``AdapterContext.ingest``, which returns only once they
are durably stored. Outbound, the delivery worker calls ``deliver`` with a
batch of ``Delivery`` records for one target group, in order, whose ids are
already the target's own wherever the gateway knows them; ``deliver`` returns
the native ids it created (or raises a ``DeliveryError``), and may ask for
follow-up deliveries to other targets of its own platform (``Followup``: e.g.
one per fediverse server an event must reach), which the core queues, retries
on the adapter's ``RETRY`` schedule and dead-letters like any other delivery.

Where it is: the adapter's key-value state (``AdapterState``, ``MemoryState``,
``StoreState``) is in ``gateway.adapter_state``, importable from here.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import msgspec
from msgspec import Struct

from gateway.adapter_state import AdapterState, MemoryState, StoreState  # noqa: F401 (re-exported)
from gateway.ids import EventId, GroupId, NativeId, PlatformName
from gateway.intake import BodyReader
from gateway.retry import DEFAULT, RetrySchedule

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.metrics import Metrics


class Capabilities(Struct, frozen=True, kw_only=True):
    """What a platform can express. The core degrades what a target lacks
    (documented per field) and counts each degradation; it never drops
    meaning silently."""

    html: bool = True
    """Carries rich text. Without it only ``text`` is sent."""
    content_warning: Literal["native", "first_line"] = "native"
    """native: ``warning`` is kept as a field; first_line: the warning is put
    before the text as "CW: ..." and a blank line (it is never dropped)."""
    reactions: bool = True
    """Without reactions they are dropped (never turned into counts or replies)."""
    edits: bool = True
    """Without edits an edit becomes a new message marked as a correction."""
    threads: bool = True
    """Without threads ``thread`` is dropped and ``reply_to`` kept."""
    batch_max: int = 1
    """Most events one ``deliver`` call takes."""


class Inbound(Struct, frozen=True, gc=False):
    """One native event, decoded, with the platform's own ids."""

    platform: PlatformName
    group: GroupId
    event_id: EventId
    """The platform's id of the event itself: the idempotency key."""
    type: str
    """A schema event type name, e.g. "civic.message.created"."""
    payload: Any
    """An instance of ``schemas.v1.EVENT_TYPES[type]``."""
    time: float
    """Unix seconds when the event happened (or was received)."""


class Delivery(Struct, frozen=True, gc=False):
    """One event for one target group, ids already translated for that target."""

    event_id: EventId
    """Stable across retries and restarts: a target can drop what it has seen."""
    group: GroupId
    type: str
    payload: Any
    time: float
    """When the event happened at its origin (Unix seconds)."""
    origin: PlatformName
    """The platform the event came from (for "via ..." labels)."""


class Followup(Struct, frozen=True, gc=False):
    """A further delivery an adapter asks the core to make, to another target
    group of its own platform (e.g. ``inbox:<host>``, one per fediverse server
    an event reaches). The core queues it as an ordinary outbox row, in the
    same transaction that records the delivery that asked for it, so a crash
    in between only delivers the first again (which asks again, with the same
    ids); it then reaches ``deliver`` as a ``Delivery`` whose ``type`` is this
    ``type`` and whose ``payload`` is ``body``, as bytes."""

    group: GroupId
    event_id: EventId
    """Stable: the same follow-up asked for again carries the same id."""
    type: str
    """The adapter's own kind of follow-up, e.g. "activitypub.post": not a
    schema event type (those start with "civic.")."""
    body: bytes
    """Whatever the adapter needs to make the delivery (it encodes it)."""


class DeliveryResult(Struct, frozen=True):
    """Native ids a target created: id the gateway sent -> the target's own id;
    and the follow-up deliveries the batch asks for."""

    ids: dict[str, NativeId] = msgspec.field(default_factory=dict)
    followups: tuple[Followup, ...] = ()


class IngestResult(Struct, frozen=True):
    accepted: int
    duplicates: int
    outcomes: tuple[str, ...] = ()
    """Per event, in order: "accepted" (relayed), "duplicate", or the reason it
    was not relayed ("unlinked", "echo", "policy_ban", "banned", ...), for
    adapters that act on what the gateway accepted (e.g. a hosted group
    sharing a post with its followers only when it was relayed)."""


Ingest = Callable[[Sequence[Inbound]], Awaitable[IngestResult]]


class Overloaded(Exception):
    """Raised by ``ingest`` when the gateway sheds load; answer 429/503 with Retry-After."""

    def __init__(self, status: int, retry_after: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after


class BanRule(Struct, frozen=True):
    """A person or a server whose events no platform may bring in, as an
    adapter imported it (e.g. from a Matrix policy list room). The gateway
    drops every event whose acting person matches, whichever platform it
    enters from (``gateway.policy``)."""

    kind: Literal["user", "server"]
    """user: ``glob`` matches the person's whole native id; server: it matches
    the server part of the id (``gateway.policy.server_of``)."""
    glob: str
    """``*`` any run of characters, ``?`` one character; everything else is
    literal, case-sensitive; the whole string must match."""
    reason: str | None = None
    source: str = ""
    """Where the rule came from (a policy room, a file), for logs and operators."""


class AdapterContext(Struct, kw_only=True):
    """What the core hands an adapter when it creates it."""

    name: PlatformName
    config: Any
    """The adapter's own ``Config`` struct, validated."""
    ingest: Ingest
    metrics: "Metrics"
    gateway_source: str
    node: str = "local"
    """This gateway node's name (unique in a cluster): for client ids and the like."""
    leads: Callable[[str], bool] = lambda key: True
    """Whether this node should do the one-at-a-time work named ``key`` now (in
    a cluster one node at a time holds each key, by the same leases that share
    out the target groups; alone, always True). For example one consumer of a
    feed whose order matters. Ask again now and then: it changes when nodes
    come and go."""
    state: AdapterState = msgspec.field(default_factory=MemoryState)
    """The adapter's durable key-value space (the gateway gives each platform
    its own in the store; the default, in memory, is for tests)."""
    set_ban_rules: Callable[[Sequence[BanRule]], None] = lambda rules: None
    """Replace ALL the ban rules this platform contributes with ``rules`` (an
    empty sequence withdraws them). The gateway applies the rules of every
    platform to what enters from any platform. Rules live in memory: call
    again after a restart (keep what is needed to rebuild them in ``state``)."""
    groups: tuple[str, ...] = ()
    """This platform's groups that the config links (for adapters that must
    join them, or refuse to join anything else)."""
    set_up: Callable[[bool, str], None] = lambda up, reason: None
    """Report whether this platform can move events now: ``set_up(False, why)``
    when it cannot (its broker or homeserver unreachable, ``why`` says so for
    an operator), ``set_up(True, "")`` when it can again. Call it on every
    change (repeats are harmless). The gateway shows it as
    ``civic_platform_up{platform}`` and in ``/readyz``, and logs each change.
    Until an adapter reports, its platform counts as up: adapters that only
    take events over the gateway's HTTP server (webhook, ActivityPub) never
    report, and their delivery failures show in the outbox metrics."""
    read_body: BodyReader = msgspec.field(default_factory=BodyReader)
    """Reads a request body within bounds: ``await ctx.read_body(request,
    limit)`` after the request's headers proved who sends it; raises
    ``gateway.intake.BodyError`` (413, 408, or 503 with Retry-After). One
    per gateway, shared by every adapter, so the bytes of all bodies being
    received count against one budget (``[gateway] body_budget``)."""
    send: Callable[[Sequence[Followup]], Awaitable[None]] | None = None
    """Queue deliveries to this platform's own targets outside ``deliver``
    (e.g. the ``Accept`` of a fediverse ``Follow``): returns once they are
    durably in the gateway's outbox, which then delivers them like the
    ``followups`` of a ``DeliveryResult``. None where there is no gateway (tests)."""


class Adapter(abc.ABC):
    """Base of every platform adapter.

    Subclasses set ``kind``, ``Config`` (a msgspec Struct with
    ``forbid_unknown_fields=True``; a check in its ``__post_init__`` raises
    ``ValueError("`key`: what is wrong")`` so the error names the key and its
    line) and ``capabilities``, and register under the
    ``civic_gateway.adapters`` entry-point group by kind.
    """

    kind: ClassVar[str]
    Config: ClassVar[type[Struct]]
    RETRY: ClassVar[RetrySchedule] = DEFAULT
    """When the core retries a failed delivery to this platform, and when it
    gives up (``gateway.retry``; the schedules table is in docs/operations.md)."""
    only_one: ClassVar[bool] = False
    """True when a gateway can hold one platform of this kind at most (e.g. it
    serves fixed paths such as ``/.well-known/webfinger``); the config check
    refuses a second one."""

    def __init__(self, ctx: AdapterContext) -> None:
        self.ctx = ctx
        self.name = ctx.name

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this platform instance can express (may depend on its config)."""

    @property
    def retry_schedule(self) -> RetrySchedule:
        """The retry schedule the delivery engine uses for this platform:
        ``RETRY`` unless the adapter adjusts it from its config."""
        return self.RETRY

    def routes(self) -> list["web.RouteDef"]:
        """Extra HTTP routes this adapter serves on the gateway's server."""
        return []

    async def handle_events(self, request: "web.Request") -> "web.StreamResponse":
        """Serve ``POST /v1/platforms/{name}/events`` for this platform. Adapters
        that take events another way keep this default (404)."""
        from gateway.problem import problem

        return problem(404, f"platform {self.name!r} does not take events over HTTP", "unknown-platform")

    async def start(self) -> None:
        """Called once before the gateway takes traffic (open clients, connect)."""

    async def stop(self) -> None:
        """Called once at shutdown, after delivery has stopped."""

    @abc.abstractmethod
    async def deliver(self, batch: Sequence[Delivery]) -> DeliveryResult:
        """Send ``batch`` (one target group, in order, at most
        ``capabilities.batch_max`` events) and return the native ids created.
        Raise ``TransientDeliveryError`` to retry later or
        ``PermanentDeliveryError`` when retrying cannot help."""
