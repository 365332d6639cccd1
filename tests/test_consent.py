"""Consent: a person who withdraws it stops crossing links, and every copy of
their messages in the linked groups is deleted (over real HTTP, three sites)."""

from __future__ import annotations

from tests.conftest import Net
from tests.sitekit import wait_for


def person(pid: str, name: str) -> dict:
    return {"id": pid, "name": name, "identity": "pseudonymous"}


async def post(net: Net, site: str, mid: str, text: str, author: dict, **extra: object) -> None:
    s = net.senders[site]
    status, _ = await s.send([s.event("civic.message.created", f"g-{site}",
                                      {"id": mid, "author": author, "text": text, **extra})])
    assert status == 202


def texts(net: Net, site: str) -> list[str]:
    return [e["data"]["text"] for e in net.sites[site].of_type("civic.message.created")]


async def test_withdrawn_consent_deletes_every_copy_and_stops_relaying(net3: Net) -> None:
    a, b, c = (net3.sites[n] for n in "abc")
    alice, bob = person("alice", "Alice"), person("bob", "Bob")
    await post(net3, "a", "a1", "first from alice", alice)
    await post(net3, "a", "a2", "second from alice", alice)
    await post(net3, "a", "a3", "bob stays", bob)
    await wait_for(lambda: len(texts(net3, "b")) == 3 and len(texts(net3, "c")) == 3, what="three messages")
    alice_copies_b = sorted(b.own_ids[e["data"]["id"]] for e in b.of_type("civic.message.created")
                            if e["data"]["author"]["name"] == "Alice")
    alice_copies_c = sorted(c.own_ids[e["data"]["id"]] for e in c.of_type("civic.message.created")
                            if e["data"]["author"]["name"] == "Alice")
    assert len(alice_copies_b) == 2 and len(alice_copies_c) == 2

    sa = net3.senders["a"]
    status, _ = await sa.send([sa.event("civic.profile.updated", "g-a", {"actor": alice, "consent": "withdrawn"})])
    assert status == 202
    await wait_for(lambda: len(b.of_type("civic.message.deleted")) == 2 and len(c.of_type("civic.message.deleted")) == 2,
                   what="the copies deleted")
    assert sorted(e["data"]["id"] for e in b.of_type("civic.message.deleted")) == alice_copies_b
    assert sorted(e["data"]["id"] for e in c.of_type("civic.message.deleted")) == alice_copies_c
    assert "withdrew" in b.of_type("civic.message.deleted")[0]["data"]["reason"]
    assert a.of_type("civic.message.deleted") == []  # her own site keeps what she posted there
    assert b.of_type("civic.profile.updated") == []  # nothing of her crosses, not even the update

    await post(net3, "a", "a4", "alice after withdrawing", alice)
    await post(net3, "a", "a5", "bob after", bob, mentions=[alice])
    await wait_for(lambda: "bob after" in texts(net3, "b"), what="bob's message")
    assert "alice after withdrawing" not in texts(net3, "b") + texts(net3, "c")
    bob_after = next(e for e in b.of_type("civic.message.created") if e["data"]["text"] == "bob after")
    assert bob_after["data"].get("mentions", []) == []  # not even named in others' mentions
    assert net3.gw.metrics.dropped.labels("a", "no_consent")._value.get() == 1

    # granted again: she crosses again (what was deleted stays deleted)
    await sa.send([sa.event("civic.profile.updated", "g-a", {"actor": alice, "consent": "granted"})])
    await post(net3, "a", "a6", "alice is back", alice)
    await wait_for(lambda: "alice is back" in texts(net3, "c"), what="alice back")


async def test_withdrawal_also_reaches_copies_in_other_groups_of_the_same_platform(net3: Net) -> None:
    """A reply made on c to alice's message is not hers: it stays."""
    b, c = net3.sites["b"], net3.sites["c"]
    alice = person("alice", "Alice")
    await post(net3, "a", "a1", "hello", alice)
    await wait_for(lambda: c.of_type("civic.message.created"), what="copy on c")
    c_id = c.own_ids[c.of_type("civic.message.created")[0]["data"]["id"]]
    await post(net3, "c", "c-1", "a reply by carol", person("carol", "Carol"), reply_to=c_id)
    await wait_for(lambda: len(b.of_type("civic.message.created")) == 2, what="reply on b")
    sa = net3.senders["a"]
    await sa.send([sa.event("civic.profile.updated", "g-a", {"actor": alice, "consent": "withdrawn"})])
    await wait_for(lambda: b.of_type("civic.message.deleted") and c.of_type("civic.message.deleted"), what="deleted")
    assert len(b.of_type("civic.message.deleted")) == 1  # only alice's message, not carol's reply
    assert net3.sites["a"].of_type("civic.message.deleted") == []
