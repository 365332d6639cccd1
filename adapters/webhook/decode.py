"""Site -> gateway, pure: request body to ``Inbound`` records. No I/O."""

from __future__ import annotations

import re

import msgspec

from gateway.adapter import Inbound
from gateway.errors import DecodeError
from gateway.ids import EventId, GroupId, PlatformName
from schemas.cloudevents import (
    BATCH_CONTENT_TYPE,
    CONTENT_TYPE,
    CloudEventBase,
    batch_decoder,
    event_type,
    parse_time,
    single_decoder,
)

_AT = re.compile(r"^(.*) - at `\$(\[(\d+)\])?(.*)`$")


def check_content_type(content_type: str) -> bool:
    """True for a batch, False for a single event; DecodeError 415 otherwise."""
    if content_type == CONTENT_TYPE:
        return False
    if content_type == BATCH_CONTENT_TYPE:
        return True
    raise DecodeError(f"Content-Type must be {CONTENT_TYPE} or {BATCH_CONTENT_TYPE}, not {content_type or 'none'!r}",
                      status=415)


def decode_body(content_type: str, body: bytes) -> list[CloudEventBase]:
    """The CloudEvents in a request body; DecodeError (415 or 400) naming what is wrong."""
    batch = check_content_type(content_type)
    try:
        if batch:
            return batch_decoder.decode(body)
        return [single_decoder.decode(body)]
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = _AT.match(msg)
        if not m:
            raise DecodeError(f"invalid event: {msg}") from None
        index = int(m.group(3)) if m.group(3) is not None else 0
        field = "$" + m.group(4) if m.group(4) else "$"
        if not batch:
            field = "$" + (m.group(2) or "") + m.group(4) if m.group(2) else field
        raise DecodeError(f"invalid event: {m.group(1)}", index=index, field=field) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}") from None
    except RecursionError:  # msgspec refuses nesting deeper than the interpreter's limit
        raise DecodeError("malformed JSON: nested too deeply") from None


def to_inbound(platform: PlatformName, event: CloudEventBase, now: float) -> Inbound:
    return Inbound(platform=platform, group=GroupId(event.subject), event_id=EventId(event.id),
                   type=event_type(event), payload=event.data,  # type: ignore[attr-defined]
                   time=parse_time(event.time, now))
