"""Bad input never crashes ingress: every malformed body gets a 4xx with a
reason, the gateway keeps serving, and nothing is stored."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.webhook import decode
from gateway.errors import DecodeError
from schemas.cloudevents import BATCH_CONTENT_TYPE, CONTENT_TYPE
from tests.conftest import Net
from tests.sitekit import wait_for

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30)

event_like = st.fixed_dictionaries({
    "specversion": st.sampled_from(["1.0", "0.3", 1]),
    "id": st.text(max_size=8) | st.integers(),
    "source": st.text(max_size=8),
    "type": st.sampled_from(["civic.message.created", "civic.reaction.added", "civic.membership.changed",
                             "civic.moderation.action", "civic.nope"]),
    "subject": st.text(max_size=8),
    "data": json_values,
})


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, event_like, st.lists(event_like, max_size=3)), st.booleans())
def test_decode_accepts_or_names_the_problem(value: object, batch: bool) -> None:
    body = json.dumps(value).encode()
    try:
        events = decode.decode_body(BATCH_CONTENT_TYPE if batch else CONTENT_TYPE, body)
    except DecodeError as exc:
        assert exc.status == 400 and str(exc)
        return
    assert all(e.specversion == "1.0" and e.id and e.subject for e in events)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_random_bytes_are_refused_as_malformed(body: bytes) -> None:
    try:
        decode.decode_body(CONTENT_TYPE, body)
    except DecodeError as exc:
        assert exc.status == 400
    # a few byte strings are valid events by chance; anything else must be a DecodeError


BOMBS = {
    "deep arrays": b"[" * 100_000 + b"]" * 100_000,
    "deep objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "NaN": b'{"specversion":"1.0","id":"x","source":"s","type":"civic.message.created","subject":"g",'
           b'"data":{"id":"m","author":{"id":"u"},"text":NaN}}',
    "lone surrogate": b'{"specversion":"1.0","id":"x","source":"s","type":"civic.message.created","subject":"g",'
                      b'"data":{"id":"m","author":{"id":"u"},"text":"\\ud800"}}',
    "a million-element batch": b"[" + b",".join([b"{}"] * 200_000) + b"]",
    "a huge string": b'{"specversion":"1.0","id":"x","source":"s","type":"civic.message.created","subject":"g",'
                     b'"data":{"id":"m","author":{"id":"u"},"text":"' + b"x" * 70_000 + b'"}}',
    "empty": b"",
}


@pytest.mark.parametrize("name", list(BOMBS))
async def test_payload_bombs_get_400_or_413_and_the_gateway_keeps_serving(net3: Net, name: str) -> None:
    sa, b = net3.senders["a"], net3.sites["b"]
    body = BOMBS[name]
    status, answer = await sa.send([{}], body=body, batch=body.startswith(b"["))
    assert status in (400, 413), (status, answer)
    assert answer["error"]
    good = sa.event("civic.message.created", "g-a", {"id": "m-ok", "author": {"id": "u"}, "text": "still here"})
    assert (await sa.send([good]))[0] == 202
    await wait_for(lambda: b.of_type("civic.message.created"), what="the good event")
    assert [e["data"]["text"] for e in b.of_type("civic.message.created")] == ["still here"]
    assert orjson.loads(orjson.dumps(answer))  # the error is JSON
