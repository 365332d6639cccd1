"""Ban rules adapters import (``gateway.policy``): the matcher on its own, and the
gateway dropping what a banned person sends from any platform."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.adapter import AdapterContext, BanRule, MemoryState
from gateway.runtime import Gateway
from gateway.config import parse
from gateway.policy.banrules import BanRules, glob_pattern, server_of
from tests.conftest import start_net, stop_net
from tests.sitekit import Site, free_port, new_secret, wait_for
from tests.test_e2e_webhook import msg


def user(glob: str) -> BanRule:
    return BanRule("user", glob, "spam", "!policies:example.org")


def server(glob: str) -> BanRule:
    return BanRule("server", glob)


# -- the matcher --------------------------------------------------------------------------

def test_no_rules_match_nothing_and_are_falsy() -> None:
    rules = BanRules()
    assert not rules and len(rules) == 0
    assert rules.match("@anyone:example.org") is None


def test_user_globs_on_matrix_ids() -> None:
    exact, glob = user("@spam:evil.org"), user("@bot*:example.org")
    rules = BanRules([exact, glob])
    assert rules.match("@spam:evil.org") is exact
    assert rules.match("@bot:example.org") is glob
    assert rules.match("@bot-42:example.org") is glob
    assert rules.match("@robot:example.org") is None, "the whole id must match"
    assert rules.match("@bot-42:example.org.evil") is None
    assert rules.match("@spam:evil.org2") is None
    assert rules.match("@SPAM:evil.org") is None, "case-sensitive"


def test_server_rules_on_matrix_ids() -> None:
    evil, sub = server("evil.org"), server("*.bad.net")
    rules = BanRules([evil, sub])
    assert rules.match("@anyone:evil.org") is evil
    assert rules.match("@a:b:evil.org") is None, "the server is all after the first ':'"
    assert rules.match("@x:spam.bad.net") is sub
    assert rules.match("@x:bad.net") is None
    assert rules.match("@evil.org:good.org") is None, "the localpart is not the server"
    ported = server("evil.org:*")
    assert BanRules([ported]).match("@x:evil.org:8448") is ported
    assert BanRules([evil]).match("@x:evil.org:8448") is None, "a port is part of the server name"


def test_server_rules_on_activitypub_urls() -> None:
    host = server("mastodon.evil")
    rules = BanRules([host])
    assert rules.match("https://mastodon.evil/users/spammer") is host
    assert rules.match("http://mastodon.evil") is host
    assert rules.match("https://mastodon.evil/") is host
    assert rules.match("https://u:p@mastodon.evil/users/x") is host, "user info is not the host"
    assert rules.match("https://mastodon.evil:8443/users/x") is None
    assert rules.match("https://good.social/users/mastodon.evil") is None
    assert rules.match("https://mastodon.evil.good.social/users/x") is None
    ported = server("mastodon.evil:8443")
    assert BanRules([ported]).match("https://mastodon.evil:8443/users/x") is ported


def test_server_rules_on_acct_and_handles() -> None:
    host = server("evil.social")
    rules = BanRules([host])
    assert rules.match("acct:spammer@evil.social") is host
    assert rules.match("spammer@evil.social") is host
    assert rules.match("@spammer@evil.social") is host
    assert rules.match("acct:evil.social@good.social") is None


def test_ids_without_a_server_part_match_no_server_rule() -> None:
    rules = BanRules([server("*")])
    for actor_id in ("alice", "spammer-1", "12345", "acct:", "user@", "@local", "https://"):
        assert rules.match(actor_id) is None, actor_id
    assert rules.match("@x:anything") is not None


def test_server_of() -> None:
    assert server_of("@a:example.org") == "example.org"
    assert server_of("@a:example.org:8448") == "example.org:8448"
    assert server_of("https://social.example/users/a?x=1") == "social.example"
    assert server_of("https://[::1]:8443/users/a") == "[::1]:8443"
    assert server_of("acct:a@social.example") == "social.example"
    assert server_of("a@b@social.example") == "social.example"
    assert server_of("alice") is None and server_of("") is None


def test_question_mark_and_star() -> None:
    one, run = user("spam?"), user("a*b*c")
    rules = BanRules([one, run])
    assert rules.match("spam1") is one
    assert rules.match("spam") is None and rules.match("spam12") is None
    assert rules.match("abc") is run and rules.match("a-b-c") is run and rules.match("axxbyyc") is run
    assert rules.match("ab") is None and rules.match("abcd") is None
    assert BanRules([user("*")]).match("anything at all") is not None
    assert BanRules([user("*")]).match("") is not None
    assert BanRules([user("a*")]).match("a\nb") is not None, "a run may hold any character"


def test_regex_metacharacters_in_globs_are_literal() -> None:
    dotted = user("@a.b:x.org")
    rules = BanRules([dotted, user("[ab]+(c)|d$"), user(r"back\slash*"), user("^caret{2}")])
    assert rules.match("@a.b:x.org") is dotted
    assert rules.match("@aXb:x.org") is None and rules.match("@a.b:xXorg") is None
    assert rules.match("[ab]+(c)|d$") is not None
    assert rules.match("a") is None and rules.match("d") is None and rules.match("abc") is None
    assert rules.match(r"back\slash and more") is not None and rules.match("backslash") is None
    assert rules.match("^caret{2}") is not None and rules.match("caret") is None and rules.match("caree") is None
    assert glob_pattern("a.*?") == r"a\..*."


def test_which_rule_matches_among_many_globs() -> None:
    rules = BanRules([user(f"@spam{i}-*:x.org") for i in range(300)] + [server("evil.org")])
    hit = rules.match("@spam217-whatever:x.org")
    assert hit is not None and hit.glob == "@spam217-*:x.org"
    assert rules.match("@spam300-x:x.org") is None
    hit = rules.match("@anyone:evil.org")
    assert hit is not None and hit.kind == "server"
    # globs indexed by their literal start, their literal end, or neither, side by side
    start, end, middle, other = user("@bot?*"), user("*:spam.org"), user("*casino*"), user("*x*y*")
    mixed = BanRules([start, end, middle, other, user("@bot-exact")])
    assert mixed.match("@bot1") is start and mixed.match("@bot") is None and mixed.match("@b") is None
    assert mixed.match("@a:spam.org") is end and mixed.match(":spam.org") is end and mixed.match("spam.org") is None
    assert mixed.match("@online-casino-99:x.org") is middle and mixed.match("@casin:x.org") is None
    assert mixed.match("axbyc") is other and mixed.match("ayxb") is None
    assert mixed.match("@bot-exact") is not None


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        BanRules([BanRule("room", "!x:y")])  # type: ignore[arg-type]


# -- adapter state in memory ------------------------------------------------------------------

async def test_memory_state_behaves_like_the_store() -> None:
    s = MemoryState()
    await s.put({"b": b"2", "a/2": b"x", "a/1": b"\x00", "c": None})
    assert await s.get(["a/1", "b", "zz"]) == {"a/1": b"\x00", "b": b"2"}
    assert await s.get_one("b") == b"2" and await s.get_one("zz") is None
    assert await s.scan("a/") == [("a/1", b"\x00"), ("a/2", b"x")]
    assert await s.scan("", limit=2) == [("a/1", b"\x00"), ("a/2", b"x")]
    await s.put({"a/1": None, "b": b"3"})
    assert await s.scan("") == [("a/2", b"x"), ("b", b"3")]
    with pytest.raises(ValueError):
        await s.put({"k" * 513: b"x"})


def test_adapter_context_defaults() -> None:
    async def ingest(events: object) -> None:
        raise AssertionError

    a = AdapterContext(name="x", config=None, ingest=ingest, metrics=None, gateway_source="s")  # type: ignore[arg-type]
    b = AdapterContext(name="y", config=None, ingest=ingest, metrics=None, gateway_source="s")  # type: ignore[arg-type]
    assert isinstance(a.state, MemoryState) and a.state is not b.state
    a.set_ban_rules([user("x")])  # no gateway: accepted and ignored


# -- through the gateway ----------------------------------------------------------------------------

async def test_ban_rules_from_one_platform_drop_what_any_platform_brings(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"])
    try:
        site_a, sb = net.sites["a"], net.senders["b"]
        gw = net.gw
        assert gw.pipeline is not None and gw.pipeline.state.ban_rules is None
        gw.adapters["a"].ctx.set_ban_rules([BanRule("user", "spammer*", "spam", "policy-room")])
        assert gw.metrics.ban_rules.labels("a")._value.get() == 1

        status, body = await sb.send([sb.event("civic.message.created", "g-b", msg("b-1", "buy pills",
                                                                                 author="spammer-1"))])
        assert (status, body) == (202, {"accepted": 1, "duplicates": 0, "not_relayed": [
            {"index": 0, "id": body["not_relayed"][0]["id"], "reason": "policy_ban"}]}), "stored and dropped, not refused"
        await sb.send([sb.event("civic.message.created", "g-b", msg("b-2", "hello", author="alice"))])
        await wait_for(lambda: site_a.of_type("civic.message.created"), what="alice's message")
        await asyncio.sleep(0.2)
        assert [e["data"]["text"] for e in site_a.of_type("civic.message.created")] == ["hello"]
        assert gw.metrics.dropped.labels("b", "policy_ban")._value.get() == 1

        gw.adapters["a"].ctx.set_ban_rules([])
        assert gw.pipeline.state.ban_rules is None and gw.metrics.ban_rules.labels("a")._value.get() == 0
        await sb.send([sb.event("civic.message.created", "g-b", msg("b-3", "I am back", author="spammer-1"))])
        await wait_for(lambda: len(site_a.of_type("civic.message.created")) == 2, what="the spammer's next message")
        assert site_a.of_type("civic.message.created")[1]["data"]["text"] == "I am back"
        assert gw.metrics.dropped.labels("b", "policy_ban")._value.get() == 1
    finally:
        await stop_net(net)


async def test_rules_set_before_the_pipeline_exists_apply_from_the_start(tmp_path: Path) -> None:
    text = (f'[gateway]\nlisten = "127.0.0.1:{free_port()}"\ndatabase = "{tmp_path}/gw.db"\n'
            + Site("a", new_secret(), prefix="aa-").config())
    gw = Gateway(parse(text, "t.toml"))
    gw.adapters["a"].ctx.set_ban_rules([BanRule("server", "evil.org")])
    gw.adapters["a"].ctx.set_ban_rules([BanRule("server", "evil.org"), BanRule("user", "x")])
    await gw.start()
    try:
        assert gw.pipeline is not None and gw.pipeline.state.ban_rules is not None
        assert len(gw.pipeline.state.ban_rules) == 2
        assert gw.pipeline.state.ban_rules.match("@x:evil.org") is not None
        await gw.adapters["a"].ctx.state.put({"k": b"\x00v"})
        assert await gw.store.state_get("a", ["k"]) == {"k": b"\x00v"}, "the store-backed state, scoped to a"
        assert await gw.store.state_get("b", ["k"]) == {}
        assert await gw.adapters["a"].ctx.state.get_one("k") == b"\x00v"
    finally:
        await gw.stop()
