"""End to end over real HTTP sockets: three webhook sites linked through the gateway."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import Net, start_net, stop_net
from tests.sitekit import CE, Sender, wait_for


def msg(mid: str, text: str, *, author: str = "alice", name: str = "Alice", identity: str = "pseudonymous",
        **extra: object) -> dict:
    return {"id": mid, "author": {"id": author, "name": name, "identity": identity}, "text": text, **extra}


async def test_message_reply_edit_reaction_delete_carry_each_sites_ids(net3: Net) -> None:
    a, b, c = (net3.sites[n] for n in "abc")
    sa, sb, sc = (net3.senders[n] for n in "abc")

    status, body = await sa.send([sa.event("civic.message.created", "g-a", msg(
        "m-1", "Hello neighbours", html="<p>Hello <b>neighbours</b><script>x()</script></p>",
        warning="talks about illness", sensitive=True, language="nl"))])
    assert (status, body) == (202, {"accepted": 1, "duplicates": 0})
    await wait_for(lambda: b.of_type("civic.message.created") and c.of_type("civic.message.created"), what="create")
    got_b = b.of_type("civic.message.created")[0]
    got_c = c.of_type("civic.message.created")[0]
    assert got_b["subject"] == "g-b" and got_c["subject"] == "g-c"
    assert got_b["civicorigin"] == "a"
    data = got_b["data"]
    assert data["text"] == "Hello neighbours"
    assert data["html"] == "<p>Hello <b>neighbours</b></p>"  # sanitised on entry
    assert data["warning"] == "talks about illness" and data["sensitive"] is True
    assert data["author"]["name"] == "Alice" and data["author"]["id"] != "alice"
    gw_id = data["id"]
    assert gw_id.startswith("cgm_") and got_c["data"]["id"] == gw_id
    b_id, c_id = b.own_ids[gw_id], c.own_ids[gw_id]

    # c replies to its own copy, naming it by c's own id
    await sc.send([sc.event("civic.message.created", "g-c", msg("c-reply-1", "Welcome!", author="carol",
                                                                  name="Carol", reply_to=c_id))])
    await wait_for(lambda: a.of_type("civic.message.created") and len(b.of_type("civic.message.created")) == 2,
                   what="reply")
    assert a.of_type("civic.message.created")[0]["data"]["reply_to"] == "m-1"
    assert b.of_type("civic.message.created")[1]["data"]["reply_to"] == b_id

    # a edits the original
    await sa.send([sa.event("civic.message.edited", "g-a", msg("m-1", "Hello neighbours (edited)",
                                                                warning="talks about illness"))])
    await wait_for(lambda: b.of_type("civic.message.edited") and c.of_type("civic.message.edited"), what="edit")
    assert b.of_type("civic.message.edited")[0]["data"]["id"] == b_id
    assert c.of_type("civic.message.edited")[0]["data"]["id"] == c_id
    assert c.of_type("civic.message.edited")[0]["data"]["warning"] == "talks about illness"

    # b reacts to its copy
    await sb.send([sb.event("civic.reaction.added", "g-b",
                            {"message": b_id, "author": {"id": "bob", "name": "Bob"}, "key": "👍"})])
    await wait_for(lambda: a.of_type("civic.reaction.added") and c.of_type("civic.reaction.added"), what="reaction")
    assert a.of_type("civic.reaction.added")[0]["data"]["message"] == "m-1"
    assert c.of_type("civic.reaction.added")[0]["data"]["message"] == c_id
    assert a.of_type("civic.reaction.added")[0]["data"]["key"] == "👍"

    # a deletes the original: every copy goes
    await sa.send([sa.event("civic.message.deleted", "g-a", {"id": "m-1"})])
    await wait_for(lambda: b.of_type("civic.message.deleted") and c.of_type("civic.message.deleted"), what="delete")
    assert b.of_type("civic.message.deleted")[0]["data"]["id"] == b_id
    assert c.of_type("civic.message.deleted")[0]["data"]["id"] == c_id


async def test_membership_and_moderation_removal_arrive_and_are_logged_publicly(net3: Net) -> None:
    b = net3.sites["b"]
    sa = net3.senders["a"]
    await sa.send([sa.event("civic.message.created", "g-a", msg("m-9", "buy cheap pills", author="spammer",
                                                                  name="Spammer"))])
    await wait_for(lambda: b.of_type("civic.message.created"), what="spam copy")
    b_copy = b.own_ids[b.of_type("civic.message.created")[0]["data"]["id"]]

    status, _ = await sa.send([
        sa.event("civic.membership.changed", "g-a",
                 {"member": {"id": "dave", "name": "Dave"}, "state": "joined", "role": "member"}),
        sa.event("civic.moderation.action", "g-a",
                 {"action": "remove_message", "message": "m-9", "by": {"id": "mod1", "name": "Mo (moderator)"},
                  "reason": "advertising", "category": "spam"}),
    ])
    assert status == 202
    await wait_for(lambda: b.of_type("civic.membership.changed") and b.of_type("civic.moderation.action"),
                   what="membership and moderation")
    mem = b.of_type("civic.membership.changed")[0]["data"]
    assert mem["state"] == "joined" and mem["member"]["name"] == "Dave" and mem["member"]["id"] != "dave"
    mod = b.of_type("civic.moderation.action")[0]["data"]
    assert mod["action"] == "remove_message" and mod["message"] == b_copy
    assert mod["reason"] == "advertising" and mod["category"] == "spam"

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{net3.url}/v1/moderation-log") as resp:
            log = await resp.json()
    entry = log["entries"][0]
    assert entry["action"] == "remove_message" and entry["subject"] == "a message"
    assert entry["moderator"] == "a moderator of group g-a on a"  # pseudonymous: shown by role only
    assert "Mo (moderator)" not in str(log)
    assert entry["reason"] == "advertising" and entry["link"] == "together"


async def test_repeated_event_is_delivered_once(net3: Net) -> None:
    b = net3.sites["b"]
    sa = net3.senders["a"]
    ev = sa.event("civic.message.created", "g-a", msg("m-2", "once"), event_id="fixed-id-1")
    assert (await sa.send([ev]))[1] == {"accepted": 1, "duplicates": 0}
    assert (await sa.send([ev]))[1] == {"accepted": 0, "duplicates": 1}
    assert (await sa.send([ev, ev], batch=True))[1] == {"accepted": 0, "duplicates": 2}
    await wait_for(lambda: b.of_type("civic.message.created"), what="delivery")
    await _settle(net3)
    assert [r.event["data"]["text"] for r in b.events] == ["once"]


async def test_echoed_events_do_not_loop(net3: Net) -> None:
    a, b, c = (net3.sites[n] for n in "abc")
    b.echo_to = net3.senders["b"]  # b's own hooks re-emit everything it receives
    sa = net3.senders["a"]
    await sa.send([sa.event("civic.message.created", "g-a", msg("m-3", "no loops please"))])
    await sa.send([sa.event("civic.reaction.added", "g-a",
                            {"message": "m-3", "author": {"id": "zed", "name": "Zed"}, "key": "🙂"})])
    await wait_for(lambda: b.of_type("civic.reaction.added") and c.of_type("civic.reaction.added"), what="relay")
    await _settle(net3)
    assert a.events == []  # nothing came back to its source
    assert len(c.of_type("civic.message.created")) == 1 and len(c.events) == 2
    assert len(b.events) == 2
    echo_drops = net3.gw.metrics.dropped.labels("b", "echo")._value.get()
    assert echo_drops == 2


async def test_a_site_down_for_a_while_gets_everything_in_order(net3: Net) -> None:
    c = net3.sites["c"]
    c.fail_with, c.retry_after = 503, "0"
    sa = net3.senders["a"]
    for i in range(30):
        await sa.send([sa.event("civic.message.created", "g-a", msg(f"order-{i}", f"n{i}"))])
    await wait_for(lambda: c.refused >= 3, what="c refusing")
    assert c.of_type("civic.message.created") == []
    c.fail_with = None
    await wait_for(lambda: len(c.of_type("civic.message.created")) == 30, timeout=20, what="recovery")
    assert [e["data"]["text"] for e in c.of_type("civic.message.created")] == [f"n{i}" for i in range(30)]
    assert net3.gw.metrics.retries.labels("c")._value.get() >= 3


async def _settle(net: Net, quiet: float = 0.3) -> None:
    """Wait until nothing is left to deliver and no event arrived for ``quiet`` seconds."""
    def total() -> int:
        return sum(len(s.events) for s in net.sites.values())
    last, since = total(), time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        import asyncio
        await asyncio.sleep(0.05)
        now_total = total()
        if now_total != last:
            last, since = now_total, time.monotonic()
        elif time.monotonic() - since > quiet and net.gw.delivery.pending() == 0:
            return


async def test_bad_input_gets_its_status_and_nothing_is_stored(net3: Net) -> None:
    sa, b = net3.senders["a"], net3.sites["b"]
    good = sa.event("civic.message.created", "g-a", msg("m-bad", "fine"), event_id="ev-bad-1")

    status, body = await sa.send([good], body=b'{"specversion": "1.0", "id": ')
    assert status == 400 and "malformed JSON" in body["error"]

    broken = dict(good, data=dict(good["data"], author={"id": 42}))
    status, body = await sa.send([good, broken], batch=True)
    assert status == 400 and body["index"] == 1 and body["field"] == "$.data.author.id"

    status, body = await sa.send([dict(good, type="civic.unknown")])
    assert status == 400

    status, body = await sa.send([good], sign_with=b"x" * 32)
    assert status == 401 and "signature" in body["error"]
    status, body = await sa.send([good], timestamp=int(time.time()) - 600)
    assert status == 401 and "timestamp" in body["error"]
    status, body = await sa.send([good], headers={"webhook-signature": ""})
    assert status == 401

    status, body = await sa.send([good], content_type="application/json")
    assert status == 415

    huge = sa.event("civic.message.created", "g-a", msg("m-big", "x" * 60000))
    status, body = await sa.send([huge] * 20, batch=True)
    assert status == 413

    s = await sa.session()
    async with s.post(f"{net3.url}/v1/platforms/nosuch/events", data=orjson.dumps(good),
                      headers={"content-type": CE}) as resp:
        assert resp.status == 404
        assert "nosuch" in (await resp.json())["error"]

    # none of it was stored: the same event id is new, and nothing was delivered before it
    assert b.events == []
    assert (await sa.send([good]))[1] == {"accepted": 1, "duplicates": 0}
    await wait_for(lambda: b.of_type("civic.message.created"), what="the good event")
    assert net3.gw.metrics.decode_errors.labels("a", "401")._value.get() == 3


async def test_overload_answers_429_and_503_with_retry_after(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"], extra_gateway="max_backlog = 2")
    try:
        net.sites["b"].fail_with = 503
        sa = net.senders["a"]
        for i in range(3):
            status, _ = await sa.send([sa.event("civic.message.created", "g-a", msg(f"o-{i}", "x"))])
            assert status == 202
        status, body = await sa.send([sa.event("civic.message.created", "g-a", msg("o-x", "x"), event_id="late")])
        assert status == 429 and "undelivered" in body["error"]
        s = await sa.session()
        ev = sa.event("civic.message.created", "g-a", msg("o-y", "y"))
        net.gw.ingress.outbox_depth = 0
        net.gw.store.backlog = lambda: 10**6  # type: ignore[method-assign]
        async with s.post(sa.url, data=orjson.dumps(ev), headers=_signed(sa, orjson.dumps(ev))) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        # the refused event was not stored: accepted as new once the load is gone
        del net.gw.store.backlog
        status, body = await sa.send([sa.event("civic.message.created", "g-a", msg("o-x", "x"), event_id="late")])
        assert (status, body) == (202, {"accepted": 1, "duplicates": 0})
    finally:
        await stop_net(net)


def _signed(sender, body: bytes) -> dict[str, str]:
    from adapters.webhook.signing import sign
    ts = int(time.time())
    return {"content-type": CE, "webhook-id": "w1", "webhook-timestamp": str(ts),
            "webhook-signature": sign(sender.key, "w1", ts, body)}


async def test_a_reply_queued_before_its_parent_was_delivered_names_the_sites_own_id(tmp_path: Path) -> None:
    """b is down while a posts a message and a reply to it: the reply was
    queued before b named its own id for the parent, and still arrives
    pointing at b's own id (resolved at delivery time)."""
    net = await start_net(tmp_path, ["a", "b"], batch_max=1)
    try:
        a, b = net.sites["a"], net.sites["b"]
        b.fail_with, b.retry_after = 503, "0"
        sa = net.senders["a"]
        await sa.send([sa.event("civic.message.created", "g-a", msg("p-1", "parent"))])
        await sa.send([sa.event("civic.message.created", "g-a", msg("r-1", "reply", reply_to="p-1"))])
        await wait_for(lambda: b.refused >= 2, what="b refusing")
        b.fail_with = None
        await wait_for(lambda: len(b.of_type("civic.message.created")) == 2, what="both delivered")
        parent, reply = b.of_type("civic.message.created")
        assert reply["data"]["reply_to"] == b.own_ids[parent["data"]["id"]] != parent["data"]["id"]
        assert a.events == []
    finally:
        await stop_net(net)


async def test_an_event_failing_past_retry_max_age_goes_to_the_dead_letters(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"], extra_gateway="retry_max_age = 0.5")
    try:
        b = net.sites["b"]
        b.fail_with, b.retry_after = 503, "0"
        sa = net.senders["a"]
        await sa.send([sa.event("civic.message.created", "g-a", msg("late-1", "too late"))])
        await wait_for(lambda: net.gw.metrics.dead_lettered.labels("b")._value.get() == 1, what="dead letter")
        letters = await net.gw.store.dead_letters()
        assert len(letters) == 1 and "gave up after" in letters[0].error and "503" in letters[0].error
        assert b.events == []
    finally:
        await stop_net(net)


async def test_the_original_event_time_travels(net3: Net) -> None:
    sa, b = net3.senders["a"], net3.sites["b"]
    ev = dict(sa.event("civic.message.created", "g-a", msg("t-1", "from the past")), time="2026-01-02T03:04:05Z")
    assert (await sa.send([ev]))[0] == 202
    await wait_for(lambda: b.of_type("civic.message.created"), what="delivery")
    assert b.of_type("civic.message.created")[0]["time"] == "2026-01-02T03:04:05.000+00:00"


async def test_a_retried_batch_keeps_its_webhook_id_while_more_events_queue(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"], batch_max=5)
    try:
        b = net.sites["b"]
        b.fail_with, b.retry_after = 503, "0"
        sa = net.senders["a"]
        await sa.send([sa.event("civic.message.created", "g-a", msg("k-0", "first"))])
        await wait_for(lambda: b.refused >= 1, what="first refusal")
        for i in range(1, 4):  # more arrive while the first delivery is being retried
            await sa.send([sa.event("civic.message.created", "g-a", msg(f"k-{i}", f"n{i}"))])
        refused_before = b.refused
        await wait_for(lambda: b.refused >= refused_before + 2, what="more retries")
        b.fail_with = None
        await wait_for(lambda: len(b.of_type("civic.message.created")) == 4, what="all four")
        first = b.events[0]
        assert first.event["data"]["text"] == "first"
        assert first.webhook_id == first.event["id"]  # the retried delivery was the single first event
        assert [e["data"]["text"] for e in b.of_type("civic.message.created")] == ["first", "n1", "n2", "n3"]
    finally:
        await stop_net(net)


async def test_echoed_reports_deletions_and_moderation_do_not_loop(net3: Net) -> None:
    """Events with no stand-in author to give the echo away (an anonymous
    report, a deletion, a moderator's action) are recognised as echoes by
    what was just sent to that group."""
    a, b, c = (net3.sites[n] for n in "abc")
    sa = net3.senders["a"]
    await sa.send([sa.event("civic.message.created", "g-a", msg("e-1", "to be reported"))])
    await wait_for(lambda: b.of_type("civic.message.created") and c.of_type("civic.message.created"), what="copies")
    b.echo_to = net3.senders["b"]  # from now on b sends back everything it receives
    await sa.send([
        sa.event("civic.report.filed", "g-a", {"message": "e-1", "category": "spam", "text": "ads"}),
        sa.event("civic.moderation.action", "g-a", {"action": "kick", "member": {"id": "zz", "name": "Zz"},
                                                    "reason": "rules"}),
        sa.event("civic.message.deleted", "g-a", {"id": "e-1"}),
    ], batch=True)
    await wait_for(lambda: c.of_type("civic.message.deleted") and b.of_type("civic.message.deleted"),
                   what="relayed")
    await _settle(net3)
    assert a.events == []
    assert [r.event["type"] for r in c.events] == [
        "civic.message.created", "civic.report.filed", "civic.moderation.action", "civic.message.deleted"]
    assert net3.gw.metrics.dropped.labels("b", "echo")._value.get() == 3


async def test_an_echo_is_recognised_by_a_node_that_did_not_send_the_original(net3: Net) -> None:
    """In a cluster a site may echo to another node than the one that sent; after
    a restart the sender's memory is gone. The fingerprints in the store cover both:
    here the echo arrives after the gateway's in-memory fingerprints were dropped."""
    a, b, c = (net3.sites[n] for n in "abc")
    sa, pipeline = net3.senders["a"], net3.gw.pipeline
    assert pipeline is not None
    await sa.send([sa.event("civic.message.created", "g-a", msg("f-1", "to be removed"))])
    await wait_for(lambda: b.of_type("civic.message.created") and c.of_type("civic.message.created"), what="copies")

    class ForgetfulNode(Sender):  # the echo reaches a node that remembers nothing
        async def send(self, events, **kw):  # type: ignore[no-untyped-def, override]
            pipeline.echoes.forget()
            return await super().send(events, **kw)

    b.echo_to = ForgetfulNode(net3.url, "b", b.secret)
    try:
        await sa.send([sa.event("civic.moderation.action", "g-a", {"action": "kick", "member": {"id": "yy"},
                                                                   "reason": "rules"})])
        await wait_for(lambda: c.of_type("civic.moderation.action") and b.of_type("civic.moderation.action"),
                       what="relayed")
        await _settle(net3)
        assert net3.gw.metrics.dropped.labels("b", "echo")._value.get() == 1
        assert [r.event["type"] for r in c.events] == ["civic.message.created", "civic.moderation.action"]
        assert a.events == []
    finally:
        await b.echo_to.close()
