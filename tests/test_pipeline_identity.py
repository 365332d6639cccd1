"""Identity levels, reports, bans and account moves, through a real gateway
with real webhook sites on 127.0.0.1 (see tests/conftest.py)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import aiohttp

from gateway.runtime import Gateway
from tests.conftest import Net, start_net, stop_net
from tests.sitekit import Sender, Site, wait_for

_n = itertools.count(1)


def person(pid: str, name: str | None = None, identity: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": pid}
    if name is not None:
        out["name"] = name
    if identity is not None:
        out["identity"] = identity
    return out


async def post(sender: Sender, group: str, author: dict[str, Any], text: str, **extra: Any) -> str:
    """Send one civic.message.created; returns the native message id."""
    mid = f"{sender.platform}-m{next(_n)}"
    status, body = await sender.send([sender.event("civic.message.created", group,
                                                   {"id": mid, "author": author, "text": text, **extra})])
    assert status == 202, body
    return mid


async def send(sender: Sender, type_: str, group: str, data: dict[str, Any]) -> None:
    status, body = await sender.send([sender.event(type_, group, data)])
    assert status == 202, body


def texts(site: Site, group: str | None = None) -> list[str]:
    return [e["data"]["text"] for e in site.of_type("civic.message.created")
            if group is None or e["subject"] == group]


def by_text(site: Site, text: str, group: str | None = None) -> dict[str, Any]:
    found = [e for e in site.of_type("civic.message.created")
             if e["data"]["text"] == text and (group is None or e["subject"] == group)]
    assert len(found) == 1, (text, group, texts(site))
    return found[0]["data"]


async def arrived(site: Site, text: str, group: str | None = None) -> dict[str, Any]:
    await wait_for(lambda: text in texts(site, group), what=f"{text!r} on {site.name} {group or ''}")
    return by_text(site, text, group)


def dropped(net: Net, platform: str, reason: str) -> float:
    return net.gw.metrics.dropped.labels(platform, reason)._value.get()


async def metrics_text(net: Net) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{net.url}/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


TWO_GROUPS_ON_B = ('[[links]]\nname = "one"\ngroups = [{platform = "a", group = "g-a"}, {platform = "b", group = "g-b1"}]\n'
                   '[[links]]\nname = "two"\ngroups = [{platform = "a", group = "g-a"}, {platform = "b", group = "g-b2"}]\n')


# -- identity levels ------------------------------------------------------------------

async def test_anonymous_author_is_unlinkable_across_groups_and_stable_within_one(net3: Net) -> None:
    b, c = net3.sites["b"], net3.sites["c"]
    sa = net3.senders["a"]
    anon = person("alice", "Alice Jansen", "anonymous")
    await post(sa, "g-a", anon, "first")
    await post(sa, "g-a", anon, "second")
    await post(sa, "g-a", person("bert", "Bert", "anonymous"), "other person")
    for site in (b, c):
        await arrived(site, "other person")

    b1, b2, c1 = by_text(b, "first")["author"], by_text(b, "second")["author"], by_text(c, "first")["author"]
    for author in (b1, b2, c1):
        assert "name" not in author
        assert author["id"].startswith("anon_")
        assert author.get("identity") == "anonymous"
        assert "alice" not in author["id"].lower()
    assert b1["id"] == b2["id"]  # the same person, the same group: the same stand-in
    assert b1["id"] != c1["id"]  # another group cannot link them
    assert by_text(b, "other person")["author"]["id"] != b1["id"]  # another person, another stand-in
    # the name is nowhere in what the targets received
    for site in (b, c):
        assert all("Alice" not in str(r.event) for r in site.events)


async def test_anonymous_stand_ins_differ_between_two_groups_on_one_platform(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"], links=TWO_GROUPS_ON_B)
    try:
        b, sa = net.sites["b"], net.senders["a"]
        anon = person("alice", "Alice", "anonymous")
        await post(sa, "g-a", anon, "hello both")
        await post(sa, "g-a", anon, "again")
        g1 = (await arrived(b, "hello both", "g-b1"))["author"]
        g2 = (await arrived(b, "hello both", "g-b2"))["author"]
        again1 = (await arrived(b, "again", "g-b1"))["author"]
        again2 = (await arrived(b, "again", "g-b2"))["author"]
        assert g1["id"].startswith("anon_") and g2["id"].startswith("anon_")
        assert "name" not in g1 and "name" not in g2
        assert g1["id"] != g2["id"]
        assert (again1["id"], again2["id"]) == (g1["id"], g2["id"])
    finally:
        await stop_net(net)


async def test_pseudonymous_author_has_name_and_stable_id_that_is_not_native(net3: Net) -> None:
    b, c = net3.sites["b"], net3.sites["c"]
    sa = net3.senders["a"]
    bob = person("bob-native-7", "Bob de Vries", "pseudonymous")
    await post(sa, "g-a", bob, "one")
    await post(sa, "g-a", bob, "two")
    await post(sa, "g-a", person("carla", "Carla"), "three")
    await arrived(b, "three")
    await arrived(c, "three")
    one, two, one_c = by_text(b, "one")["author"], by_text(b, "two")["author"], by_text(c, "one")["author"]
    assert one["name"] == "Bob de Vries" and one_c["name"] == "Bob de Vries"
    assert one["id"] == two["id"]
    assert one["id"] != "bob-native-7" and "bob-native-7" not in one["id"]
    assert not one["id"].startswith("anon_")
    assert by_text(b, "three")["author"]["id"] != one["id"]


async def test_identified_author_keeps_name_and_level(net3: Net) -> None:
    b, sa = net3.sites["b"], net3.senders["a"]
    await post(sa, "g-a", person("dr-m", "Dr. Meijer", "identified"), "advice")
    author = (await arrived(b, "advice"))["author"]
    assert author["name"] == "Dr. Meijer" and author["identity"] == "identified"
    assert author["id"] != "dr-m"


# -- reports ---------------------------------------------------------------------------

async def test_a_reporter_crosses_only_when_identified(net3: Net) -> None:
    b = net3.sites["b"]
    sa = net3.senders["a"]
    mid = await post(sa, "g-a", person("spammer", "Spammer"), "cheap pills")
    copy = await arrived(b, "cheap pills")
    await wait_for(lambda: copy["id"] in b.own_ids, what="b names its copy")
    for level in ("anonymous", "pseudonymous", "identified"):
        await send(sa, "civic.report.filed", "g-a", {
            "category": "spam", "message": mid, "text": f"reported as {level}",
            "reporter": person(f"rep-{level}", f"Reporter {level}", level)})
    await wait_for(lambda: len(b.of_type("civic.report.filed")) == 3, what="three reports")
    reports = {r["data"]["text"]: r["data"] for r in b.of_type("civic.report.filed")}
    for level in ("anonymous", "pseudonymous"):
        assert "reporter" not in reports[f"reported as {level}"]
        assert f"Reporter {level}" not in str(reports[f"reported as {level}"])
    shown = reports["reported as identified"]
    assert shown["reporter"]["name"] == "Reporter identified"
    assert shown["reporter"]["id"] != "rep-identified"
    assert shown["message"] == b.own_ids[copy["id"]]  # b's own id of the reported message
    assert shown["category"] == "spam"


# -- bans --------------------------------------------------------------------------------

async def test_ban_stops_later_messages_and_unban_lets_them_through(net3: Net) -> None:
    a, b, c = (net3.sites[n] for n in "abc")
    sa = net3.senders["a"]
    troll = person("troll", "Troll")
    mod = person("mod-1", "Mo")
    await post(sa, "g-a", troll, "before the ban")
    await arrived(b, "before the ban")
    await send(sa, "civic.moderation.action", "g-a",
               {"action": "ban", "member": troll, "by": mod, "reason": "abuse", "category": "harassment"})
    await wait_for(lambda: b.of_type("civic.moderation.action") and c.of_type("civic.moderation.action"),
                   what="ban relayed")
    relayed = b.of_type("civic.moderation.action")[0]["data"]
    assert relayed["action"] == "ban" and relayed["member"]["id"] == by_text(b, "before the ban")["author"]["id"]

    await post(sa, "g-a", troll, "during the ban")
    await post(sa, "g-a", person("ann", "Ann"), "marker 1")
    await arrived(b, "marker 1")
    await arrived(c, "marker 1")
    assert "during the ban" not in texts(b) and "during the ban" not in texts(c)
    assert dropped(net3, "a", "banned") == 1
    assert 'civic_dropped_total{platform="a",reason="banned"} 1.0' in await metrics_text(net3)

    await send(sa, "civic.moderation.action", "g-a", {"action": "unban", "member": troll, "by": mod})
    await post(sa, "g-a", troll, "after the unban")
    await arrived(b, "after the unban")
    await arrived(c, "after the unban")
    assert dropped(net3, "a", "banned") == 1
    assert a.events == []

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{net3.url}/v1/moderation-log") as resp:
            entries = (await resp.json())["entries"]
    assert [e["action"] for e in entries] == ["ban", "unban"]
    assert entries[0]["reason"] == "abuse"
    # a pseudonymous troll is shown by the pseudonym and the id the linked groups know them by;
    # a moderator who is not identified, by their role only
    assert entries[0]["subject"] == "Troll" and entries[0]["subject_identity"] == "pseudonymous"
    assert entries[0]["subject_id"] == by_text(b, "before the ban")["author"]["id"]
    assert entries[0]["moderator"] == "a moderator of group g-a on a"
    assert "Mo" not in str(entries) and "mod-1" not in str(entries)


async def test_a_ban_that_names_a_message_too_bans_the_member(net3: Net) -> None:
    """A ban given with the offending message and its author bans the author
    (the message is what the log calls the subject)."""
    b, c = net3.sites["b"], net3.sites["c"]
    sa = net3.senders["a"]
    troll = person("troll", "Troll")
    mid = await post(sa, "g-a", troll, "the offending post")
    await arrived(b, "the offending post")
    await send(sa, "civic.moderation.action", "g-a", {"action": "ban", "message": mid, "member": troll,
                                                      "by": person("mod-1", "Mo"), "reason": "abuse"})
    await post(sa, "g-a", troll, "after a ban with a message")
    await post(sa, "g-a", person("ann", "Ann"), "marker 6")
    await arrived(b, "marker 6")
    await arrived(c, "marker 6")
    assert "after a ban with a message" not in texts(b) and "after a ban with a message" not in texts(c)
    assert dropped(net3, "a", "banned") == 1


async def test_ban_on_another_site_of_a_relayed_member_stops_their_messages(net3: Net) -> None:
    """b's moderator only knows the troll by the id the gateway gave b; banning
    that id must stop the troll's messages from a reaching b and c."""
    b, c = net3.sites["b"], net3.sites["c"]
    sa, sb = net3.senders["a"], net3.senders["b"]
    await post(sa, "g-a", person("troll", "Troll"), "hi from a")
    seen_as = (await arrived(b, "hi from a"))["author"]
    await send(sb, "civic.moderation.action", "g-b", {"action": "ban", "member": seen_as, "by": person("bmod", "Bea")})
    await post(sa, "g-a", person("troll", "Troll"), "still here?")
    await post(sa, "g-a", person("ann", "Ann"), "marker 2")
    await arrived(b, "marker 2")
    await arrived(c, "marker 2")
    assert "still here?" not in texts(b) and "still here?" not in texts(c)
    assert dropped(net3, "a", "banned") == 1


async def test_ban_of_an_anonymous_stand_in_stops_that_person(net3: Net) -> None:
    b, c = net3.sites["b"], net3.sites["c"]
    sa, sb = net3.senders["a"], net3.senders["b"]
    anon = person("shy", "Shy", "anonymous")
    await post(sa, "g-a", anon, "anon 1")
    stand_in = (await arrived(b, "anon 1"))["author"]
    await send(sb, "civic.moderation.action", "g-b", {"action": "ban", "member": stand_in, "by": person("bmod")})
    await post(sa, "g-a", anon, "anon 2")
    await post(sa, "g-a", person("ann", "Ann"), "marker 3")
    await arrived(b, "marker 3")
    await arrived(c, "marker 3")
    assert "anon 2" not in texts(b) and "anon 2" not in texts(c)


async def test_an_action_on_an_anonymous_stand_in_names_each_groups_own_stand_in(net3: Net) -> None:
    a, b, c = (net3.sites[n] for n in "abc")
    sa, sb = net3.senders["a"], net3.senders["b"]
    await post(sa, "g-a", person("shy", "Shy", "anonymous"), "anon here")
    on_b = (await arrived(b, "anon here"))["author"]
    on_c = (await arrived(c, "anon here"))["author"]
    await send(sb, "civic.moderation.action", "g-b",
               {"action": "kick", "member": {"id": on_b["id"]}, "by": person("bmod", "Bea")})
    await wait_for(lambda: a.of_type("civic.moderation.action") and c.of_type("civic.moderation.action"),
                   what="kick relayed")
    assert a.of_type("civic.moderation.action")[0]["data"]["member"]["id"] == "shy"
    assert c.of_type("civic.moderation.action")[0]["data"]["member"]["id"] == on_c["id"]


async def test_a_ban_survives_a_gateway_restart(net3: Net) -> None:
    b, sa = net3.sites["b"], net3.senders["a"]
    troll = person("troll", "Troll")
    await send(sa, "civic.moderation.action", "g-a", {"action": "ban", "member": troll, "by": person("mod")})
    await wait_for(lambda: b.of_type("civic.moderation.action"), what="ban relayed")
    await restart(net3)
    await post(sa, "g-a", troll, "after restart")
    await post(sa, "g-a", person("ann", "Ann"), "marker 4")
    await arrived(b, "marker 4")
    assert "after restart" not in texts(b)
    assert dropped(net3, "a", "banned") == 1


# -- profiles ------------------------------------------------------------------------------

async def test_an_anonymous_profile_update_is_not_relayed(net3: Net) -> None:
    b, c = net3.sites["b"], net3.sites["c"]
    sa = net3.senders["a"]
    await send(sa, "civic.profile.updated", "g-a", {"actor": person("alice", "Alice Secret", "anonymous")})
    await send(sa, "civic.profile.updated", "g-a", {"actor": person("bob", "Bob Public", "pseudonymous")})
    await wait_for(lambda: b.of_type("civic.profile.updated") and c.of_type("civic.profile.updated"),
                   what="the pseudonymous update")
    await post(sa, "g-a", person("ann", "Ann"), "marker 5")
    await arrived(b, "marker 5")
    await arrived(c, "marker 5")
    for site in (b, c):
        updates = site.of_type("civic.profile.updated")
        assert [u["data"]["actor"]["name"] for u in updates] == ["Bob Public"]
        assert all("Alice Secret" not in str(r.event) for r in site.events)
    assert dropped(net3, "a", "anonymous") == 1


# -- account moves -------------------------------------------------------------------------

async def test_a_moved_account_is_the_same_person_and_shown_by_its_own_id(net3: Net) -> None:
    """alice on a moves to account X on b: from then on b shows alice's
    messages from a as X's (b's own account), and X's messages on b reach a
    as alice (a's own account) and c as the same person as before."""
    a, b, c = (net3.sites[n] for n in "abc")
    sa, sb = net3.senders["a"], net3.senders["b"]
    alice = person("alice", "Alice", "pseudonymous")
    await post(sa, "g-a", alice, "before moving")
    before_b = (await arrived(b, "before moving"))["author"]
    before_c = (await arrived(c, "before moving"))["author"]
    assert before_b["id"] != "X-on-b"

    # the new account declares the old one first (its half of the move)
    await send(sb, "civic.profile.updated", "g-b",
               {"actor": person("X-on-b", "Alice"), "also_known_as": [{"platform": "a", "id": "alice"}]})
    await send(sa, "civic.account.moved", "g-a",
               {"actor": alice, "target": {"platform": "b", "id": "X-on-b", "name": "Alice"}})
    await wait_for(lambda: b.of_type("civic.account.moved") and c.of_type("civic.account.moved"), what="move")
    assert b.of_type("civic.account.moved")[0]["data"]["target"]["id"] == "X-on-b"

    await post(sa, "g-a", alice, "after moving, from a")
    after_b = (await arrived(b, "after moving, from a"))["author"]
    assert after_b["id"] == "X-on-b"  # b's own account instead of a gateway stand-in
    assert after_b["name"] == "Alice"
    assert (await arrived(c, "after moving, from a"))["author"]["id"] == before_c["id"]

    await post(sb, "g-b", person("X-on-b", "Alice"), "from my new home")
    on_a = (await arrived(a, "from my new home"))["author"]
    on_c = (await arrived(c, "from my new home"))["author"]
    assert on_a["id"] == "alice"  # a knows her by her own account there
    assert on_c["id"] == before_c["id"]  # c sees the same person as before the move
    assert "from my new home" not in texts(b)  # nothing echoes back to its source


async def test_an_anonymous_account_move_is_not_relayed_and_keeps_anonymity(net3: Net) -> None:
    b, c = net3.sites["b"], net3.sites["c"]
    sa = net3.senders["a"]
    anon = person("hidden", "Hidden", "anonymous")
    await send(sa, "civic.account.moved", "g-a", {"actor": anon, "target": {"platform": "b", "id": "Y-on-b"}})
    await post(sa, "g-a", anon, "still anonymous")
    author = (await arrived(b, "still anonymous"))["author"]
    await arrived(c, "still anonymous")
    assert author["id"].startswith("anon_") and author["id"] != "Y-on-b"
    assert b.of_type("civic.account.moved") == [] and c.of_type("civic.account.moved") == []


async def test_a_move_to_an_account_the_gateway_already_knows_takes_effect(net3: Net) -> None:
    """The usual case: the new account already exists on b and has posted in
    the linked group before the person moves to it."""
    b = net3.sites["b"]
    sa, sb = net3.senders["a"], net3.senders["b"]
    await post(sb, "g-b", person("X-on-b", "Alice (new)"), "hello from the new account")
    await arrived(net3.sites["a"], "hello from the new account")
    alice = person("alice", "Alice", "pseudonymous")
    await post(sa, "g-a", alice, "old account")
    await arrived(b, "old account")
    await send(sb, "civic.profile.updated", "g-b",
               {"actor": person("X-on-b", "Alice (new)"), "also_known_as": [{"platform": "a", "id": "alice"}]})
    await send(sa, "civic.account.moved", "g-a", {"actor": alice, "target": {"platform": "b", "id": "X-on-b"}})
    await post(sa, "g-a", alice, "after the move")
    assert (await arrived(b, "after the move"))["author"]["id"] == "X-on-b"


async def test_a_move_the_target_account_did_not_confirm_has_no_effect(net3: Net) -> None:
    """A site cannot claim another platform's account for one of its people:
    without the target's also_known_as the move is refused and not relayed."""
    b, c = net3.sites["b"], net3.sites["c"]
    sa, sb = net3.senders["a"], net3.senders["b"]
    await post(sb, "g-b", person("victim-on-b", "Vic"), "I am Vic")
    await arrived(c, "I am Vic")
    mallory = person("mallory", "Mallory")
    await send(sa, "civic.account.moved", "g-a", {"actor": mallory, "target": {"platform": "b", "id": "victim-on-b"}})
    await post(sa, "g-a", mallory, "mallory speaking")
    assert (await arrived(b, "mallory speaking"))["author"]["id"] != "victim-on-b"
    assert b.of_type("civic.account.moved") == [] and c.of_type("civic.account.moved") == []
    assert dropped(net3, "a", "move_unconfirmed") == 1
    # Vic's own messages still reach c as Vic, not as Mallory's stand-in
    await post(sb, "g-b", person("victim-on-b", "Vic"), "still me")
    on_c = (await arrived(c, "still me"))["author"]
    assert on_c["name"] == "Vic" and on_c["id"] == (await arrived(c, "I am Vic"))["author"]["id"]


async def restart(net: Net) -> None:
    """Stop the gateway and start a new one on the same database and port."""
    old = net.gw
    if old._runner is not None:
        await old._runner.cleanup()
    await old.stop()
    gw = Gateway(old.config)
    await gw.start()
    await gw.serve("127.0.0.1", int(net.url.rsplit(":", 1)[1]))
    net.gw = gw
