"""Typed ids. The core never passes bare strings where an id is meant."""

from __future__ import annotations

import random
import time
from typing import NamedTuple, NewType

PlatformName = NewType("PlatformName", str)
"""The operator's name for a configured platform instance, e.g. "buurt"."""
GroupId = NewType("GroupId", str)
"""A group's id as its own platform knows it."""
NativeId = NewType("NativeId", str)
"""A message, person or event id as one platform knows it."""
CanonicalId = NewType("CanonicalId", str)
"""The gateway's own id for a message or a person, the same on every platform."""
EventId = NewType("EventId", str)
"""The id of one event (inbound: the site's CloudEvent id; outbound: stable per delivery)."""
LinkName = NewType("LinkName", str)


class GroupRef(NamedTuple):
    """One group on one platform: the unit that links connect."""

    platform: PlatformName
    group: GroupId

    def __str__(self) -> str:
        return f"{self.platform}/{self.group}"


# Kinds of mapped ids (a column of the id map).
MESSAGE = "m"
ACTOR = "a"


def new_id(prefix: str) -> str:
    """A time-ordered unique id: 12 hex digits of milliseconds, 16 of randomness
    (the stdlib generator, seeded from the OS at start: ids need to be unique,
    not secret, and a system call per id showed in profiles)."""
    return f"{prefix}{time.time_ns() // 1_000_000:012x}{random.getrandbits(64):016x}"


def new_message_id() -> CanonicalId:
    return CanonicalId(new_id("cgm_"))


def new_actor_id() -> CanonicalId:
    return CanonicalId(new_id("cga_"))


def new_event_id() -> EventId:
    return EventId(new_id("cge_"))

# How a platform came by an id in the id map (the ``sent`` column):
ORIGIN = 0
"""The thing was born on this platform with this id."""
COPY = 1
"""The platform's own id for a copy the gateway made there."""
SENT = 2
"""An id the gateway made up and sent (a stand-in person, or a message id
before the platform named its own)."""
