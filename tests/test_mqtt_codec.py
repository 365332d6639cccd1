"""The MQTT adapter's pure parts: decode (structured, binary, batch, every
refusal reason), encode (every content mode, topics, error reports) and the
round trip of every event type; plus the AsyncAPI document's structure."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.mqtt import decode, encode
from adapters.mqtt.config import MqttConfig
from gateway.adapter import Delivery
from gateway.ids import EventId, GroupId, PlatformName
from schemas.cloudevents import BATCH_CONTENT_TYPE, CONTENT_TYPE, MAX_BATCH, format_time
from schemas.v1 import EVENT_TYPES

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXAMPLES = {p.stem: orjson.loads(p.read_bytes()) for p in sorted((DOCS / "examples").glob("*.json"))}
M = PlatformName("m")
NOW = 1_700_000_000.0


def event(**over: Any) -> dict[str, Any]:
    ev = {"specversion": "1.0", "id": "m-1", "source": "https://m.example", "type": "civic.message.created",
          "subject": "groep-7", "data": {"id": "post-1", "author": {"id": "user-1"}, "text": "Hello"}}
    ev.update(over)
    return {k: v for k, v in ev.items() if v is not None}


def structured(ev: Any, content_type: str | None = CONTENT_TYPE) -> decode.Received:
    return decode.Received(orjson.dumps(ev), content_type)


def binary(ev: dict[str, Any], content_type: str | None = "application/json") -> decode.Received:
    props = tuple((k, str(v)) for k, v in ev.items() if k != "data")
    return decode.Received(orjson.dumps(ev["data"]), content_type, props)


def refusal(msg: decode.Received, max_payload: int = 1 << 20) -> decode.InputError:
    with pytest.raises(decode.InputError) as info:
        decode.decode(M, msg, max_payload, NOW)
    assert info.value.reason in decode.REASONS
    return info.value


# -- decoding what sites publish ---------------------------------------------------------------

@pytest.mark.parametrize("type_", sorted(EXAMPLES))
def test_structured_and_binary_decode_every_example_alike(type_: str) -> None:
    ev = EXAMPLES[type_]
    [a] = decode.decode(M, structured(ev), 1 << 20, NOW)
    [b] = decode.decode(M, binary(ev), 1 << 20, NOW)
    assert a == b
    assert (a.platform, a.group, a.event_id, a.type) == ("m", ev["subject"], ev["id"], type_)
    assert isinstance(a.payload, EVENT_TYPES[type_])
    assert a.time != NOW  # every example has a time


def test_content_type_parameters_and_case_do_not_matter() -> None:
    for ctype in ("application/cloudevents+json; charset=utf-8", "Application/CloudEvents+JSON"):
        [ev] = decode.decode(M, structured(event(), ctype), 1 << 20, NOW)
        assert ev.event_id == "m-1"
    [ev] = decode.decode(M, binary(event(), "application/json; charset=utf-8"), 1 << 20, NOW)
    assert ev.event_id == "m-1"


def test_no_content_type_and_no_user_properties_is_structured_json() -> None:
    # what an MQTT 3.1.1 client sends (the binding implies structured JSON there)
    [ev] = decode.decode(M, structured(event(), None), 1 << 20, NOW)
    assert ev.event_id == "m-1" and ev.time == NOW  # no time attribute: the time received


def test_binary_mode_without_content_type_reads_json_data() -> None:
    [ev] = decode.decode(M, binary(event(), None), 1 << 20, NOW)
    assert ev.payload.text == "Hello"


def test_binary_mode_ignores_extension_user_properties() -> None:
    msg = binary(event())
    msg = decode.Received(msg.payload, msg.content_type, msg.user_properties + (("traceparent", "00-ab"),))
    [ev] = decode.decode(M, msg, 1 << 20, NOW)
    assert ev.event_id == "m-1"


def test_a_batch_gives_its_events_in_order() -> None:
    evs = [event(id=f"m-{i}", data={"id": f"p{i}", "author": {"id": "u"}, "text": str(i)}) for i in range(3)]
    got = decode.decode(M, structured(evs, BATCH_CONTENT_TYPE), 1 << 20, NOW)
    assert [e.event_id for e in got] == ["m-0", "m-1", "m-2"]
    assert decode.decode(M, structured([], BATCH_CONTENT_TYPE), 1 << 20, NOW) == []


# -- every refusal reason ---------------------------------------------------------------------

def test_too_large() -> None:
    err = refusal(structured(event(data={"id": "p", "author": {"id": "u"}, "text": "x" * 2000})), max_payload=1024)
    assert err.reason == "too_large" and err.status == 413 and "1024 bytes" in str(err)
    err = refusal(binary(event(data={"id": "p", "author": {"id": "u"}, "text": "x" * 2000})), max_payload=1024)
    assert err.event_id == "m-1"  # known from the user properties without reading the payload


def test_a_batch_over_the_limit() -> None:
    err = refusal(structured([event(id=f"e{i}") for i in range(MAX_BATCH + 1)], BATCH_CONTENT_TYPE))
    assert err.reason == "too_large" and str(MAX_BATCH) in str(err)


@pytest.mark.parametrize("msg", [
    decode.Received(b"hello", "text/plain"),
    decode.Received(orjson.dumps(event()), "application/cloudevents+avro"),
    binary(event(), "text/plain"),
], ids=["plain-text", "other-event-format", "binary-non-json-data"])
def test_content_type(msg: decode.Received) -> None:
    err = refusal(msg)
    assert err.reason == "content_type" and err.status == 415


@pytest.mark.parametrize("msg", [
    decode.Received(b"{not json", CONTENT_TYPE),
    decode.Received(b"[1, 2", BATCH_CONTENT_TYPE),
    decode.Received(b"", None),
    decode.Received(b"[" * 100_000, CONTENT_TYPE),
], ids=["structured", "batch", "empty", "deeply-nested"])
def test_not_json(msg: decode.Received) -> None:
    err = refusal(msg)
    assert err.reason == "not_json" and "malformed JSON" in str(err)


def test_not_json_in_binary_mode_names_the_event() -> None:
    msg = binary(event())
    err = refusal(decode.Received(b"{oops", msg.content_type, msg.user_properties))
    assert (err.reason, err.event_id) == ("not_json", "m-1")


@pytest.mark.parametrize(("msg", "field"), [
    (structured([event()]), "$"),
    (structured("a string"), "$"),
    (structured({"hello": "world"}), "$.specversion"),
    (structured(event(type=None)), "$.type"),
    (structured({"a": 1}, BATCH_CONTENT_TYPE), "$"),
    (structured([event(), 5], BATCH_CONTENT_TYPE), "$"),
], ids=["array", "string", "no-specversion", "no-type", "batch-not-array", "batch-element-not-object"])
def test_not_a_cloudevent(msg: decode.Received, field: str) -> None:
    err = refusal(msg)
    assert (err.reason, err.field) == ("not_cloudevent", field)


def test_not_a_cloudevent_when_a_user_property_repeats_differently() -> None:
    msg = binary(event())
    err = refusal(decode.Received(msg.payload, msg.content_type, msg.user_properties + (("id", "other"),)))
    assert err.reason == "not_cloudevent" and err.field == "$.id"


def test_unknown_type_names_the_event() -> None:
    for msg in (structured(event(type="civic.poll.created")), binary(event(type="civic.poll.created"))):
        err = refusal(msg)
        assert (err.reason, err.event_id, err.field) == ("unknown_type", "m-1", "$.type")
        assert "civic.poll.created" in str(err) and "civic.message.created" in str(err)


def test_schema_errors_name_the_field_and_event() -> None:
    bad = event(data={"id": "p", "author": {"id": "u"}, "text": 5})
    for msg in (structured(bad), binary(bad)):
        err = refusal(msg)
        assert (err.reason, err.event_id, err.field) == ("schema", "m-1", "$.data.text")
        assert "Expected `str`" in str(err)
    err = refusal(structured(event(subject=None)))
    assert (err.reason, err.field) == ("schema", "$.subject")
    err = refusal(structured(event(specversion="0.3")))
    assert (err.reason, err.field) == ("schema", "$.specversion")


def test_schema_errors_in_a_batch_give_the_index() -> None:
    evs = [event(id="ok"), event(id="bad", data={"id": "p", "author": {}, "text": "t"})]
    err = refusal(structured(evs, BATCH_CONTENT_TYPE))
    assert (err.reason, err.index, err.event_id, err.field) == ("schema", 1, "bad", "$.data.author.id")


def test_the_error_report_is_small_json() -> None:
    err = refusal(structured(event(data={"id": "p", "author": {"id": "u"}, "text": 5})))
    report = orjson.loads(encode.error_report(err, "civic/v1/m/in"))
    assert report == {"error": "invalid event: Expected `str`, got `int`", "reason": "schema", "field": "$.data.text",
                      "id": "m-1", "topic": "civic/v1/m/in"}


# -- encoding deliveries, and the round trip ------------------------------------------------------

def delivery(type_: str, *, group: str = "groep-7") -> Delivery:
    ev = EXAMPLES[type_]
    payload = msgspec.convert(ev["data"], EVENT_TYPES[type_])
    return Delivery(event_id=EventId("cge_123"), group=GroupId(group), type=type_, payload=payload,
                    time=1_741_944_600.0, origin=PlatformName("buurt"))


@pytest.mark.parametrize("type_", sorted(EXAMPLES))
@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_round_trip_of_every_event_type(type_: str, mode: str) -> None:
    d = delivery(type_)
    out = encode.message("urn:civic-gateway", "civic/v1", "m", d, mode)  # type: ignore[arg-type]
    assert out.topic == "civic/v1/m/out/groep-7"
    [back] = decode.decode(M, decode.Received(out.payload, out.content_type, out.user_properties), 1 << 20, NOW)
    assert (back.event_id, back.group, back.type, back.payload, back.time) == (d.event_id, d.group, d.type,
                                                                              d.payload, d.time)


def test_structured_mode_is_the_whole_cloudevent() -> None:
    out = encode.message("urn:gw", "civic/v1", "m", delivery("civic.message.created"), "structured")
    assert out.content_type == "application/cloudevents+json" and out.user_properties == ()
    ev = orjson.loads(out.payload)
    assert {k: ev[k] for k in ("specversion", "id", "source", "type", "subject", "civicorigin")} == {
        "specversion": "1.0", "id": "cge_123", "source": "urn:gw", "type": "civic.message.created",
        "subject": "groep-7", "civicorigin": "buurt"}
    assert ev["time"] == "2025-03-14T09:30:00.000+00:00"


def test_binary_mode_puts_attributes_in_user_properties() -> None:
    out = encode.message("urn:gw", "civic/v1", "m", delivery("civic.reaction.added"), "binary")
    assert out.content_type == "application/json"
    assert dict(out.user_properties) == {"specversion": "1.0", "id": "cge_123", "source": "urn:gw",
                                         "type": "civic.reaction.added", "subject": "groep-7",
                                         "time": "2025-03-14T09:30:00.000+00:00", "civicorigin": "buurt"}
    assert orjson.loads(out.payload) == EXAMPLES["civic.reaction.added"]["data"]


def test_the_event_id_is_the_delivery_id_every_time() -> None:
    d = delivery("civic.message.deleted")
    for mode in ("structured", "binary"):
        first = encode.message("urn:gw", "civic/v1", "m", d, mode)  # type: ignore[arg-type]
        again = encode.message("urn:gw", "civic/v1", "m", d, mode)  # type: ignore[arg-type]
        assert first == again


def deliveries(n: int, group: str = "groep-7", first: int = 0) -> list[Delivery]:
    """``n`` deliveries of every example type in turn, ids cge_{first}..."""
    types = sorted(EXAMPLES)
    return [msgspec.structs.replace(delivery(types[i % len(types)], group=group), event_id=EventId(f"cge_{i}"))
            for i in range(first, first + n)]


def test_batch_mode_sends_a_delivery_as_one_batch_message() -> None:
    batch = deliveries(12)
    [out] = encode.messages("urn:gw", "civic/v1", "m", batch, "batch")
    assert out.topic == "civic/v1/m/out/groep-7"
    assert out.content_type == BATCH_CONTENT_TYPE and out.user_properties == ()
    # a JSON array of exactly the events structured mode sends one by one, in order
    singles = [orjson.loads(encode.message("urn:gw", "civic/v1", "m", d, "structured").payload) for d in batch]
    assert orjson.loads(out.payload) == singles
    # the same form a site may publish: read back, they are the same events
    back = decode.decode(M, decode.Received(out.payload, out.content_type), 1 << 20, NOW)
    assert [(b.event_id, b.group, b.type, b.payload, b.time) for b in back] == [
        (d.event_id, d.group, d.type, d.payload, d.time) for d in batch]


def test_batch_mode_sends_a_single_event_structured_and_one_message_per_group() -> None:
    [one] = encode.messages("urn:gw", "civic/v1", "m", deliveries(1), "batch")
    assert one == encode.message("urn:gw", "civic/v1", "m", deliveries(1)[0], "structured")
    assert one.content_type == CONTENT_TYPE
    # the core gives one group per delivery; should it not, order and topics still hold
    mixed = deliveries(2, "a") + deliveries(1, "b", 2) + deliveries(3, "a/b", 3)
    outs = encode.messages("urn:gw", "civic/v1", "m", mixed, "batch")
    assert [(o.topic, o.content_type) for o in outs] == [
        ("civic/v1/m/out/a", BATCH_CONTENT_TYPE), ("civic/v1/m/out/b", CONTENT_TYPE),
        ("civic/v1/m/out/a%2Fb", BATCH_CONTENT_TYPE)]
    ids = []
    for o in outs:
        body = orjson.loads(o.payload)
        ids += [e["id"] for e in (body if isinstance(body, list) else [body])]
    assert ids == [f"cge_{i}" for i in range(6)]


def test_batch_mode_splits_a_delivery_larger_than_max_bytes() -> None:
    batch = deliveries(10)
    sizes = [len(encode.message("urn:gw", "civic/v1", "m", d, "structured").payload) for d in batch]
    limit = sum(sizes[:4]) + 5  # four events, their commas and brackets
    outs = encode.messages("urn:gw", "civic/v1", "m", batch, "batch", limit)
    assert all(len(o.payload) <= limit or o.content_type == CONTENT_TYPE for o in outs)
    assert len(outs[0].payload) == limit  # filled up exactly
    ids = []
    for o in outs:
        body = orjson.loads(o.payload)
        ids += [e["id"] for e in (body if isinstance(body, list) else [body])]
    assert ids == [f"cge_{i}" for i in range(10)]
    # an event larger than the bound on its own still goes, alone and structured
    tiny = encode.messages("urn:gw", "civic/v1", "m", batch[:3], "batch", 10)
    assert [o.content_type for o in tiny] == [CONTENT_TYPE] * 3


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_the_other_modes_send_one_message_per_event(mode: str) -> None:
    batch = deliveries(3)
    assert encode.messages("urn:gw", "civic/v1", "m", batch, mode) == [  # type: ignore[arg-type]
        encode.message("urn:gw", "civic/v1", "m", d, mode) for d in batch]  # type: ignore[arg-type]


@pytest.mark.parametrize("seconds", [
    0.0, -0.0, 1.9999995, 1.9999994, 1.0000005, 2.5e-6, -1.5, -0.0000005, 1_741_944_600.9995,
    253_402_300_799.999, -62_135_596_800.0, 253_402_300_800.0, -62_135_596_801.0, 1e20])
def test_event_time_is_format_time(seconds: float) -> None:
    try:
        expected: object = format_time(seconds)
    except (OverflowError, OSError, ValueError) as exc:
        expected = type(exc)
    try:
        got: object = encode.event_time(seconds)
    except (OverflowError, OSError, ValueError) as exc:
        got = type(exc)
    assert got == expected


@settings(max_examples=3000, deadline=None)
@given(st.floats(min_value=-62_135_596_800, max_value=253_402_300_799, allow_nan=False)
       | st.integers(1_600_000_000, 1_900_000_000).map(lambda s: s + 0.0005) | st.floats(1.7e9, 1.8e9))
def test_event_time_is_format_time_everywhere(seconds: float) -> None:
    assert encode.event_time(seconds) == format_time(seconds)


@pytest.mark.parametrize(("group", "level"), [
    ("groep-7", "groep-7"), ("Ünïcode grüp", "Ünïcode grüp"), ("a/b", "a%2Fb"), ("50%", "50%25"),
    ("+#", "%2B%23"), ("line\nbreak\0", "line%0Abreak%00"), ("$share", "$share"),
])
def test_group_ids_become_one_topic_level(group: str, level: str) -> None:
    assert encode.topic_level(group) == level
    assert encode.out_topic("civic/v1", "m", group) == f"civic/v1/m/out/{level}"


def test_topics() -> None:
    assert encode.in_topic("civic/v1", "m") == "civic/v1/m/in"
    assert encode.errors_topic("civic/v1", "m") == "civic/v1/m/errors"


# -- config ----------------------------------------------------------------------------------------

def test_config_reads_the_broker_url() -> None:
    c = MqttConfig(broker="mqtts://gw:p%40ss@broker.example")
    assert (c.host, c.port, c.tls, c.username, c.password) == ("broker.example", 8883, True, "gw", "p@ss")
    assert c.redacted_broker() == "mqtts://broker.example:8883"
    c = MqttConfig(broker="mqtt://gw:old@127.0.0.1:1884", username="other", password="new")
    assert (c.port, c.tls, c.username, c.password) == (1884, False, "other", "new")
    c = MqttConfig(broker="mqtt://localhost")
    assert (c.port, c.username, c.content_mode, c.batch_max, c.topic_prefix) == (1883, None, "structured", 100,
                                                                               "civic/v1")
    assert MqttConfig(broker="mqtt://localhost", content_mode="batch").content_mode == "batch"
    with pytest.raises(msgspec.ValidationError, match="content_mode"):
        msgspec.convert({"broker": "mqtt://localhost", "content_mode": "batches"}, MqttConfig)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"broker": "http://x"}, "`broker`"),
    ({"broker": "mqtt://"}, "`broker`"),
    ({"broker": "mqtt://h:99999"}, "`broker`"),
    ({"broker": "mqtt://h/path"}, "`broker`"),
    ({"broker": "mqtt://h", "password": "p"}, "`password`"),
    ({"broker": "mqtt://h", "ca_file": "/ca.pem"}, "`ca_file`"),
    ({"broker": "mqtt://h", "topic_prefix": "civic/#"}, "`topic_prefix`"),
    ({"broker": "mqtt://h", "topic_prefix": "/civic"}, "`topic_prefix`"),
    ({"broker": "mqtt://h", "topic_prefix": "$SYS/x"}, "`topic_prefix`"),
    ({"broker": "mqtt://h", "topic_prefix": ""}, "`topic_prefix`"),
])
def test_config_errors_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        MqttConfig(**kwargs)


# -- the AsyncAPI document ---------------------------------------------------------------------------

def test_asyncapi_document_describes_the_three_channels() -> None:
    doc = yaml.safe_load((DOCS / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert doc["asyncapi"].startswith("3.")
    channels = doc["channels"]
    addresses = {c["address"] for c in channels.values()}
    assert addresses == {"civic/v1/{platform}/in", "civic/v1/{platform}/out/{group}", "civic/v1/{platform}/errors"}
    for op in doc["operations"].values():
        assert op["action"] in ("send", "receive")
        assert op["channel"]["$ref"].removeprefix("#/channels/") in channels
    # every internal reference resolves
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []
    for ref in refs(doc):
        if ref.startswith("#/"):
            target: Any = doc
            for part in ref[2:].split("/"):
                target = target[part]
        else:  # a JSON Schema file of the repository
            assert (DOCS / ref.split("#")[0]).resolve().is_file(), ref
    messages = doc["components"]["messages"]
    assert {"cloudEvent", "cloudEventBatch", "cloudEventBinary", "error"} <= set(messages)


def test_the_python_examples_in_the_mqtt_docs_compile() -> None:
    text = (DOCS / "mqtt.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    for block in blocks:
        ast.parse(block)


def test_the_mqtt_docs_name_every_refusal_reason() -> None:
    text = (DOCS / "mqtt.md").read_text(encoding="utf-8")
    assert all(f"| `{reason}` |" in text for reason in decode.REASONS)
