"""The adapter kit: everything of the core a platform adapter may use, in one place.

Who may import it: the packages under ``adapters/`` (and an adapter's own
tests). An adapter imports nothing else of ``gateway``; it may import
``schemas``, the standard library and third-party packages
(``tests/test_architecture.py`` enforces this, naming file and line). The
core itself does not import this module: it is the door out, not a hub.

What is here is the core's surface for adapters. Adding a name is a
decision, not a convenience: it promises every adapter (ours and others')
that the name stays and keeps its meaning. Prefer a small function here over
handing out a core object's insides (see the metrics helpers below).

The names live in their own modules (``gateway.adapter``, ``gateway.errors``,
``gateway.netguard`` ...); this module only re-exports them and adds the
few small helpers adapters need, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from gateway.adapter import (Adapter, AdapterContext, AdapterState, BanRule, Capabilities, Delivery,
                             DeliveryResult, Followup, Inbound, Ingest, IngestResult, Overloaded)
from gateway.config import check_url
from gateway.errors import (DecodeError, DeliveryError, GatewayError, PermanentDeliveryError,
                            TransientDeliveryError, UnencodableEvent)
from gateway.ids import EventId, GroupId, NativeId, PlatformName
from gateway.intake import BodyError, BodyReader
from gateway.metrics import shared_collector
from gateway.netguard import BadURL, FetchError, GuardedSession, Signer, parse_url
from gateway.problem import problem
from gateway.registry import PlatformCommand
from gateway.retry import DEFAULT, MASTODON, RetrySchedule
from gateway.sanitize import html_to_text
from gateway.tasks import TaskGroup
from gateway.decoded import Decoded, Ignored, Item, schema_problem

T = TypeVar("T")

__all__ = [
    # The interface an adapter implements, and what the core hands it at creation.
    "Adapter", "AdapterContext", "AdapterState", "BanRule", "Capabilities",
    # Typed events: in (``Inbound`` to ``ctx.ingest``) and out (``Delivery`` to ``deliver``).
    "Delivery", "DeliveryResult", "Followup", "Inbound", "Ingest", "IngestResult", "Overloaded",
    # Retry schedules as data: an adapter names its own in its ``RETRY`` class constant.
    "DEFAULT", "MASTODON", "RetrySchedule",
    # Typed ids (NewTypes over str): say which id a string is.
    "EventId", "GroupId", "NativeId", "PlatformName",
    # The error tree: what an adapter raises so the core answers, retries or dead-letters.
    "DecodeError", "DeliveryError", "GatewayError", "PermanentDeliveryError", "TransientDeliveryError",
    "UnencodableEvent",
    # Receiving over HTTP: the shared bounded body reader's error, and RFC 9457 problem documents.
    "BodyError", "BodyReader", "problem",
    # Sending over HTTP to addresses from the outside: the guarded client (no private addresses, bounded).
    "BadURL", "FetchError", "GuardedSession", "Signer", "parse_url",
    # Metrics: count through these, or register a collector of the adapter's own.
    "count_decode_error", "count_degraded", "count_overloaded", "register_collector",
    # Background work: every task an adapter starts lives in a TaskGroup it closes in ``stop``.
    "TaskGroup",
    # The decoders' shared shapes (pure translation results) and text helpers.
    "Decoded", "Ignored", "Item", "html_to_text", "schema_problem",
    # Configuration checks (error messages name the key) and the adapter's own CLI commands.
    "PlatformCommand", "check_url",
]


# -- metrics helpers -----------------------------------------------------------------------------------
# Adapters count through these rather than reaching into ``Metrics``: the
# names and labels of the gateway's metrics stay the core's to change.

def count_decode_error(ctx: AdapterContext, status: int) -> None:
    """An inbound request or message refused as malformed or unauthorised
    (``civic_decode_errors{platform,status}``)."""
    ctx.metrics.decode_errors.labels(ctx.name, str(status)).inc()


def count_overloaded(ctx: AdapterContext, status: int) -> None:
    """An inbound request refused because the gateway sheds load
    (``civic_overload_refusals{platform,status}``), after ``Overloaded``."""
    ctx.metrics.overloaded.labels(ctx.name, str(status)).inc()


def count_degraded(ctx: AdapterContext, reason: str) -> None:
    """A part of an event the platform cannot carry (``civic_degraded{reason}``):
    never drop meaning without counting it. ``reason`` is a small fixed set
    per adapter, e.g. ``"activitypub_poll_not_carried"``."""
    ctx.metrics.degraded.labels(reason).inc()


def register_collector(ctx: AdapterContext, kind: str, make: Callable[[], T]) -> T:
    """The Prometheus collector of adapter kind ``kind`` on this gateway's
    registry, made by ``make()`` and registered on first use. One collector
    serves every platform of that kind (add the adapter to it); it reports
    plain counters the adapter keeps when Prometheus scrapes."""
    return shared_collector(ctx.metrics.registry, kind, make)
