"""The policy chain (``gateway.policy.chain``), stage by stage, and its state
(``gateway.policy.state``): immutable, swapped only after the commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway import ids
from gateway.adapter import BanRule, Inbound
from gateway.idmap import IdMap
from gateway.ids import ACTOR, CanonicalId, EventId, GroupId, GroupRef, LinkName, PlatformName
from gateway.policy import chain as C
from gateway.policy.state import Ban, Consent, Policy, PolicyState
from gateway.router import Router
from gateway.config import GroupConfig, LinkConfig
from schemas.v1 import Actor, Membership, Message, ProfileUpdate, Report
from tests.conftest import start_net, stop_net
from tests.test_e2e_webhook import msg

SRC = GroupRef(PlatformName("a"), GroupId("g-a"))


class FakeTx:
    """The few ``Tx`` calls the stages make, in memory."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.rows: dict[tuple[str, str, str, str], tuple[CanonicalId, int]] = {}

    def first_seen(self, platform: str, event_id: str, now: float) -> bool:
        new = (platform, event_id) not in self.seen
        self.seen.add((platform, event_id))
        return new

    def lookup(self, platform: str, grp: str, kind: str, native: str) -> tuple[CanonicalId, int] | None:
        return self.rows.get((platform, grp, kind, native))

    def map(self, platform: str, grp: str, kind: str, native: str, canonical: CanonicalId, how: int) -> bool:
        return self.rows.setdefault((platform, grp, kind, native), (canonical, how)) == (canonical, how)


class Echoes:
    def __init__(self, echo: bool = False) -> None:
        self.echo = echo

    def is_echo(self, tx: Any, ev: Inbound, now: float) -> bool:
        return self.echo


def link(name: str = "l", moderation: str = "mirror") -> LinkConfig:
    return LinkConfig(name=name, moderation=moderation,  # type: ignore[arg-type]
                      groups=[GroupConfig("a", "g-a"), GroupConfig("b", f"g-{name}")])


def ctx(payload: Any, etype: str = "civic.message.created", links: list[LinkConfig] | None = None,
        tx: FakeTx | None = None, echo: bool = False, event_id: str = "e1") -> C.EventContext:
    ev = Inbound(SRC.platform, SRC.group, EventId(event_id), etype, payload, 1.0)
    routes = Router([link()] if links is None else links).routes(SRC)
    return C.EventContext(tx or FakeTx(), ev, SRC, routes, 1.0, IdMap(b"k" * 32), Echoes(echo))  # type: ignore[arg-type]


def hello(author: str = "alice") -> Message:
    return Message(id="m1", author=Actor(id=author, name=author), text="hi")


def test_dedupe_lets_an_event_id_through_once() -> None:
    tx = FakeTx()
    assert C.dedupe(ctx(hello(), tx=tx), PolicyState()) == C.CONTINUE
    assert C.dedupe(ctx(hello(), tx=tx), PolicyState()).status == "duplicate"
    assert C.dedupe(ctx(hello(), tx=tx, event_id="e2"), PolicyState()) == C.CONTINUE


def test_unlinked_drops_what_no_link_names() -> None:
    assert C.unlinked(ctx(hello(), links=[]), PolicyState()) == C.drop("unlinked")
    assert C.unlinked(ctx(hello()), PolicyState()) == C.CONTINUE


def test_echo_drops_what_the_memory_recognises() -> None:
    assert C.echo(ctx(hello(), echo=True), PolicyState()) == C.drop("echo")
    assert C.echo(ctx(hello(), echo=False), PolicyState()) == C.CONTINUE


def test_ban_rules_match_the_acting_person_before_they_get_an_id() -> None:
    state = PolicyState().with_rules(PlatformName("m"), [BanRule("user", "spam*"), BanRule("server", "evil.org")])
    c = ctx(hello("spammer"))
    assert C.ban_rules(c, state) == C.drop("policy_ban")
    assert c.tx.rows == {}  # type: ignore[attr-defined]
    assert C.ban_rules(ctx(hello("@x:evil.org")), state) == C.drop("policy_ban")
    assert C.ban_rules(ctx(hello("alice")), state) == C.CONTINUE
    assert C.ban_rules(ctx(hello("spammer")), PolicyState()) == C.CONTINUE  # no rules: no match
    report = Report(category="spam")  # no acting person named
    assert C.ban_rules(ctx(report, "civic.report.filed"), state) == C.CONTINUE


def test_identify_resolves_the_acting_person_and_drops_a_gateway_stand_in() -> None:
    tx = FakeTx()
    c = ctx(hello("alice"), tx=tx)
    assert C.identify(c, PolicyState()) == C.CONTINUE
    assert c.refs.acting is not None and c.refs.acting.ref.startswith("cga_") and c.refs.acting.how == ids.ORIGIN
    tx.map("a", "", ACTOR, "cga_someone", CanonicalId("cga_someone"), ids.SENT)  # the gateway's stand-in on a
    assert C.identify(ctx(hello("cga_someone"), tx=tx), PolicyState()) == C.drop("echo")


def _identified(payload: Any, etype: str = "civic.message.created", **kw: Any) -> C.EventContext:
    c = ctx(payload, etype, **kw)
    assert C.identify(c, PolicyState()) == C.CONTINUE
    return c


def test_consent_drops_a_person_who_withdrew_it_unless_they_grant_it_again() -> None:
    c = _identified(hello("alice"))
    assert c.refs.acting is not None
    alice = c.refs.acting.ref
    withdrawn = PolicyState(withdrawn=frozenset({alice}))
    assert C.consent(c, withdrawn) == C.drop("no_consent")
    assert C.consent(c, PolicyState()) == C.CONTINUE
    granted = ctx(ProfileUpdate(actor=Actor(id="alice"), consent="granted"), "civic.profile.updated", tx=c.tx)  # type: ignore[arg-type]
    assert C.identify(granted, withdrawn) == C.CONTINUE
    assert C.consent(granted, withdrawn) == C.CONTINUE


def test_link_bans_skip_mirrored_links_where_the_person_is_banned() -> None:
    links = [link("l1"), link("l2"), link("l3", moderation="advise")]
    c = _identified(hello("alice"), links=links)
    assert c.refs.acting is not None
    alice = c.refs.acting.ref
    state = PolicyState(bans=frozenset({(LinkName("l1"), alice), (LinkName("l3"), alice)}))
    assert C.link_bans(c, state) == C.Decision(skip=frozenset({LinkName("l1")}))  # advise: not enforced
    assert C.link_bans(c, PolicyState()) == C.CONTINUE
    kicked = Membership(member=Actor(id="alice"), state="left")
    m = _identified(kicked, "civic.membership.changed", links=links, tx=c.tx)
    assert C.link_bans(m, state) == C.CONTINUE  # what is done to them still travels


def test_the_chain_stops_at_the_first_drop_cheapest_first() -> None:
    calls: list[str] = []

    def spy(name: str, result: C.Decision) -> C.Stage:
        def stage(ctx: C.EventContext, state: PolicyState) -> C.Decision:
            calls.append(name)
            return result
        return stage

    chain = [spy("one", C.CONTINUE), spy("two", C.Decision(skip=frozenset({LinkName("x")}))),
             spy("three", C.drop("why")), spy("four", C.CONTINUE)]
    assert C.run(chain, ctx(hello()), PolicyState()) == C.drop("why")
    assert calls == ["one", "two", "three"]
    assert C.run(chain[:2], ctx(hello()), PolicyState()) == C.Decision(skip=frozenset({LinkName("x")}))
    assert C.CHAIN == (C.dedupe, C.unlinked, C.echo, C.ban_rules, C.identify, C.consent, C.link_bans)


def test_a_stage_never_changes_the_state() -> None:
    state = PolicyState(bans=frozenset({(LinkName("l"), CanonicalId("cga_x"))}),
                        withdrawn=frozenset({CanonicalId("cga_y")})).with_rules(PlatformName("m"), [BanRule("user", "z")])
    before = msgspec.structs.asdict(state)
    tx = FakeTx()
    for stage in C.CHAIN:
        stage(ctx(hello("alice"), tx=tx), state)
    assert msgspec.structs.asdict(state) == before
    with pytest.raises(AttributeError):
        state.bans = frozenset()  # type: ignore[misc]


def test_effects_make_a_new_state_and_leave_the_old_one() -> None:
    x, lk = CanonicalId("cga_x"), LinkName("l")
    s0 = PolicyState()
    s1 = s0.after([Ban(lk, x, True), Consent(x, True)])
    assert (s0.bans, s0.withdrawn) == (frozenset(), frozenset())
    assert (s1.bans, s1.withdrawn) == ({(lk, x)}, {x})
    s2 = s1.after([Ban(lk, x, False), Consent(x, False)])
    assert (s2.bans, s2.withdrawn) == (frozenset(), frozenset())
    assert s2.after([]) is s2


def test_ban_rules_are_replaced_per_platform_and_a_bad_kind_changes_nothing() -> None:
    policy = Policy()
    policy.set_rules(PlatformName("m"), [BanRule("user", "x")])
    policy.set_rules(PlatformName("n"), [BanRule("user", "y")])
    assert policy.state.ban_rules is not None and len(policy.state.ban_rules) == 2
    before = policy.state
    with pytest.raises(ValueError):
        policy.set_rules(PlatformName("m"), [BanRule("planet", "mars")])
    assert policy.state is before
    policy.set_rules(PlatformName("m"), [])
    policy.set_rules(PlatformName("n"), [])
    assert policy.state.ban_rules is None and policy.state.rules == ()


async def test_a_reload_keeps_what_this_node_committed_while_it_read() -> None:
    x, y, lk = CanonicalId("cga_x"), CanonicalId("cga_y"), LinkName("l")
    policy = Policy()

    class SlowStore:  # another node banned y; this node bans x while the store is read
        async def bans(self) -> set[tuple[LinkName, CanonicalId]]:
            policy.committed([Ban(lk, x, True)])
            return {(lk, y)}

        async def withdrawn(self) -> set[CanonicalId]:
            return set()

    await policy.reload(SlowStore())
    assert policy.state.bans == {(lk, x), (lk, y)}


# -- through the gateway: the state changes only when the transaction commits ----------------------

async def test_a_failed_commit_leaves_bans_and_consent_as_they_were(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"])
    gw = net.gw
    try:
        assert gw.pipeline is not None
        transact = gw.store.transact

        async def failing(fn: Any) -> Any:
            def run(tx: Any) -> Any:
                fn(tx)
                raise RuntimeError("the commit failed")  # rolls the transaction back
            return await transact(run)

        def ev(n: int, etype: str, data: Any) -> Inbound:
            return Inbound(PlatformName("a"), GroupId("g-a"), EventId(f"ev-{n}"), etype, data, 1.0)

        await gw.ingress.ingest([ev(0, "civic.message.created", msgspec.convert(msg("m-0", "hi", author="carol"), Message))])
        ban = Membership(member=Actor(id="mallory"), state="banned", by=Actor(id="mod"))
        withdraw = ProfileUpdate(actor=Actor(id="carol"), consent="withdrawn")
        before = gw.pipeline.state
        gw.store.transact = failing  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await gw.ingress.ingest([ev(1, "civic.membership.changed", ban), ev(2, "civic.profile.updated", withdraw)])
        gw.store.transact = transact  # type: ignore[method-assign]
        assert gw.pipeline.state is before
        assert (gw.pipeline.state.bans, gw.pipeline.state.withdrawn) == (frozenset(), frozenset())
        assert await gw.store.bans() == set() and await gw.store.withdrawn() == set()

        result = await gw.ingress.ingest([ev(1, "civic.membership.changed", ban), ev(2, "civic.profile.updated", withdraw)])
        assert result.accepted == 2  # not duplicates: the failed attempt left nothing
        state = gw.pipeline.state
        assert state.bans == await gw.store.bans() and len(state.bans) == 1
        assert state.withdrawn == await gw.store.withdrawn() and len(state.withdrawn) == 1
    finally:
        await stop_net(net)
