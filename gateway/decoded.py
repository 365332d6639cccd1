"""What adapters' pure decoders share: the shape of a decoded event and the
check of a payload against the common schema's limits.

A decoder answers an ``Item`` per schema event (or an ``Ignored`` with a short
reason code); ``schema_problem`` says whether a payload breaks a limit of the
schema (a length, a media type), and where, so the decoder can raise its own
error naming the native field.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Item(msgspec.Struct, frozen=True):
    """One schema event: its type name, payload, and the id to dedupe it by."""

    type: str
    payload: Any
    event_id: str


class Decoded(msgspec.Struct, frozen=True, kw_only=True):
    """What one native event means: usually one item (some events mean several,
    e.g. a change of power levels that changes several people's roles)."""

    items: tuple[Item, ...]

    @property
    def type(self) -> str:
        return self.items[0].type

    @property
    def payload(self) -> Any:
        return self.items[0].payload


class Ignored(msgspec.Struct, frozen=True):
    """A native event the gateway does not carry, and why (a code the adapter defines)."""

    reason: str


def schema_problem(payload: Any) -> tuple[str, str] | None:
    """(what is wrong, where: a JSON path like ``.author.name`` or "") when
    ``payload`` does not fit its type's limits, else None."""
    try:
        msgspec.json.decode(msgspec.json.encode(payload), type=type(payload))
    except msgspec.ValidationError as exc:
        text = str(exc)
        at = text.rsplit(" - at `$", 1)
        return at[0], (at[1].rstrip("`") if len(at) == 2 else "")
    return None
