"""Gateway -> site, pure: deliveries to a signed request, responses to results. No I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import msgspec

from adapters.webhook.signing import sign
from gateway.kit import Delivery, DeliveryResult, NativeId, PermanentDeliveryError, TransientDeliveryError
from schemas.cloudevents import BATCH_CONTENT_TYPE, BY_TYPE, CONTENT_TYPE, CloudEventBase

_encode = msgspec.json.Encoder().encode


class _SiteAnswer(msgspec.Struct):
    ids: dict[str, str] = {}


_answer = msgspec.json.Decoder(_SiteAnswer)


def to_cloudevent(source: str, d: Delivery) -> CloudEventBase:
    return BY_TYPE[d.type](specversion="1.0", id=d.event_id, source=source, subject=d.group,  # type: ignore[call-arg]
                           time=datetime.fromtimestamp(d.time, timezone.utc).isoformat(timespec="milliseconds"),
                           civicorigin=d.origin, data=d.payload)


def webhook_id(batch: Sequence[Delivery]) -> str:
    """Stable for the same events: a retry of the same delivery carries the same id."""
    if len(batch) == 1:
        return batch[0].event_id
    return f"{batch[0].event_id}+{len(batch)}"


def request(source: str, key: bytes, batch: Sequence[Delivery], now: int) -> tuple[dict[str, str], bytes]:
    """Headers and body of the POST that delivers ``batch``."""
    events = [to_cloudevent(source, d) for d in batch]
    if len(events) == 1:
        body, ctype = _encode(events[0]), CONTENT_TYPE
    else:
        body, ctype = _encode(events), BATCH_CONTENT_TYPE
    wid = webhook_id(batch)
    headers = {"content-type": ctype, "webhook-id": wid, "webhook-timestamp": str(now),
               "webhook-signature": sign(key, wid, now, body)}
    return headers, body


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


def result(status: int, headers: Mapping[str, str], body: bytes, now: float) -> DeliveryResult:
    """What a site's answer means: ids it created, or a transient/permanent error."""
    if 200 <= status < 300:
        if not body.strip():
            return DeliveryResult()
        try:
            answer = _answer.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return DeliveryResult()  # a 2xx is a success whatever the body says
        return DeliveryResult(ids={k: NativeId(v) for k, v in answer.ids.items() if v})
    snippet = body[:200].decode("utf-8", "replace")
    if status in (408, 429) or status >= 500:
        raise TransientDeliveryError(f"HTTP {status}: {snippet}", retry_after=retry_after(headers.get("Retry-After"), now))
    raise PermanentDeliveryError(f"HTTP {status}: {snippet}")


# -- what crosses (checked by the contract suite, tests/test_adapter_contract.py) --------------------

CARRIES = frozenset({"civic.message.created", "civic.message.edited", "civic.message.deleted",
                     "civic.reaction.added", "civic.reaction.removed", "civic.membership.changed",
                     "civic.moderation.action", "civic.report.filed", "civic.profile.updated",
                     "civic.account.moved"})
"""Every event type of the common schema: a site speaks it natively."""
DEGRADATIONS: dict[str, dict[str, str]] = {}
"""Nothing changes on the way: the CloudEvent's ``data`` is the schema payload itself."""
