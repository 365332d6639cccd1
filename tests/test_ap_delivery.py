"""Deliveries to fediverse inboxes on the gateway's own outbox: the real
ActivityPub adapter and delivery engine over a real store, with the network
(the signed POST) and the clock faked.

A hosted group's event becomes one follow-up per follower inbox, queued in
the target group ``inbox:<host>`` with the group's completion; each host is
then an ordered queue of the core, retried on Mastodon's schedule and
dead-lettered like any delivery."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.activitypub import outbound as D
from adapters.activitypub.adapter import ActivityPubAdapter
from adapters.activitypub.config import ActivityPubConfig
from gateway.adapter import AdapterContext, IngestResult, StoreState
from gateway.cluster import Cluster, partition_of
from gateway.bus import LocalBus
from gateway.delivery import DeliveryEngine
from gateway.ids import EventId, GroupId, GroupRef, PlatformName
from gateway.metrics import Metrics
from gateway.netguard import FetchError
from gateway.retry import MASTODON
from gateway.store.base import Store, encode_payload
from gateway.store.postgresql import PostgresStore
from gateway.store.sqlite import SqliteStore
from gateway.tasks import TaskGroup
from schemas.v1 import Actor, Message
from tests.services import temp_database

FEDI = PlatformName("fedi")
CLUB = GroupRef(FEDI, GroupId("club"))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Fediverse:
    """The network: records each POST (host, text of the announced note) and
    answers from ``answers[host]`` (a list, used up in order; then 202; an
    int ``-1`` raises a refusal before connecting)."""

    def __init__(self, answers: dict[str, list[int]] | None = None) -> None:
        self.answers = answers or {}
        self.sent: list[tuple[str, str]] = []
        self.by: list[tuple[str, str]] = []  # (node, host)

    def post_for(self, node: str) -> Callable[[D.Post], Any]:
        async def post(p: D.Post) -> tuple[int, float | None]:
            host = D.host_of(p.inbox)
            doc = orjson.loads(p.body)
            self.sent.append((host, re.sub(r"<[^>]*>", "", doc["object"]["object"]["content"])))
            self.by.append((node, host))
            queue = self.answers.get(host, [])
            status = queue.pop(0) if queue else 202
            if status == -1:
                raise FetchError("the gateway may not connect to 10.0.0.1", transient=False)
            return status, None
        return post

    def texts(self, host: str) -> list[str]:
        return [t for h, t in self.sent if h == host]


async def ingest(_: Any) -> IngestResult:
    return IngestResult(accepted=0, duplicates=0)


def make_node(store: Store, net: Fediverse, clock: Clock, node: str = "a", *,
              retry_max_age: float = 3 * 86400.0) -> tuple[ActivityPubAdapter, DeliveryEngine, TaskGroup]:
    metrics = Metrics()
    tasks = TaskGroup()
    ctx = AdapterContext(name=FEDI, config=ActivityPubConfig(base_url="http://127.0.0.1:9", retry_max_age=retry_max_age,
                                                             allow_private_addresses=True),
                         ingest=ingest, metrics=metrics, gateway_source="test", node=node,
                         state=StoreState(store, FEDI), groups=("club",))
    ap = ActivityPubAdapter(ctx)
    ap._post = net.post_for(node)  # type: ignore[method-assign]
    engine = DeliveryEngine(store, {FEDI: ap}, metrics, tasks, clock=clock)
    ctx.send = lambda followups: engine.send(FEDI, followups)
    return ap, engine, tasks


async def follow(store: Store, *hosts: str) -> None:
    """Followers on these servers, as the adapter records an accepted Follow."""
    await StoreState(store, FEDI).put({
        f"follower:club:https://{h}/users/u": orjson.dumps({"inbox": f"https://{h}/users/u/inbox",
                                                           "shared": f"https://{h}/inbox"}) for h in hosts})


async def post_to_club(store: Store, engine: DeliveryEngine | None, *texts: str, created: float) -> None:
    def run(tx: Any) -> list[Any]:
        return [tx.enqueue(CLUB, EventId(f"ev-{t}"), "civic.message.created", PlatformName("site"), created, None,
                           encode_payload(Message(id=f"m-{t}", author=Actor(id="alice"), text=t)))
                for t in texts]
    await store.transact(run)
    if engine is not None:
        engine.wake(CLUB)


async def until(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = SqliteStore(str(tmp_path / "gw.db"))
    await s.open()
    yield s
    await s.close()


async def test_hosts_are_independent_order_is_kept_and_retries_follow_mastodons_schedule(store: Store) -> None:
    net = Fediverse({"down.example": [503, 503, 500]})
    clock = Clock()
    _, engine, tasks = make_node(store, net, clock)
    waits: list[tuple[float, float]] = []  # (wait, clock at the wait)

    async def sleep(delay: float) -> None:  # the clock jumps instead of the test waiting
        waits.append((delay, clock.now))
        clock.now += delay
        await asyncio.sleep(0.005)
    engine._sleep = sleep  # type: ignore[method-assign]
    await follow(store, "down.example", "up.example")
    await engine.start()
    await post_to_club(store, engine, "one", "two", "three", created=clock.now)

    await until(lambda: len(net.texts("up.example")) == 3, "the healthy server's three posts")
    assert net.texts("up.example") == ["one", "two", "three"]  # in order, not held up by the other server
    await until(lambda: len(net.texts("down.example")) == 6, "the failing server's posts")
    # the first post is tried until it passes (3 failures), and nothing behind it goes first
    assert net.texts("down.example") == ["one", "one", "one", "one", "two", "three"]
    # the waits between its attempts are Mastodon's: n**4 + 15 seconds, up to 50 % more
    assert len(waits) == 3
    for n, (wait, _) in enumerate(waits, start=1):
        assert n ** 4 + 15 <= wait <= 1.5 * (n ** 4 + 15), (n, wait)
    assert await store.outbox_groups() == []  # the group's event and every follow-up completed
    assert await store.dead_letter_count() == 0
    await engine.stop()
    await tasks.close()


async def test_unsalvageable_answers_and_old_deliveries_become_dead_letters(store: Store) -> None:
    net = Fediverse({"gone.example": [410], "refused.example": [-1], "auth.example": [401] * 30})
    clock = Clock()
    _, engine, tasks = make_node(store, net, clock, retry_max_age=3600)

    async def sleep(delay: float) -> None:
        clock.now += delay
        await asyncio.sleep(0.005)
    engine._sleep = sleep  # type: ignore[method-assign]
    await follow(store, "gone.example", "refused.example", "auth.example", "fine.example")
    await engine.start()
    await post_to_club(store, engine, "hello", created=clock.now)
    await until(lambda: len(net.texts("fine.example")) == 1, "the healthy server's post")

    async def dead() -> dict[str, tuple[str, int]]:
        return {d.item.target.group: (d.error, d.attempts) for d in await store.dead_letters()}
    for _ in range(500):
        if len(await dead()) == 3:
            break
        await asyncio.sleep(0.01)
    letters = await dead()
    # 410: refused for good at the first attempt; a private address: refused before sending
    assert letters["inbox:gone.example"][1] == 1 and "HTTP 410" in letters["inbox:gone.example"][0]
    assert letters["inbox:refused.example"][1] == 1 and "10.0.0.1" in letters["inbox:refused.example"][0]
    # 401 is retried (a key not fetched yet), until the delivery is older than retry_max_age
    error, attempts = letters["inbox:auth.example"]
    assert attempts > 1 and error.startswith(f"gave up after {attempts} attempts") and "HTTP 401" in error
    assert net.texts("gone.example") == ["hello"] and net.texts("refused.example") == ["hello"]
    assert "inbox:fine.example" not in letters and await store.outbox_groups() == []
    # dead letters of the fediverse replay like any other, with the same ids
    replayed = await store.replay([d.item.seq for d in await store.dead_letters()
                                   if d.item.target.group == "inbox:gone.example"])
    engine.submit(replayed)
    await until(lambda: net.texts("gone.example") == ["hello", "hello"], "the replayed post")
    await engine.stop()
    await tasks.close()


async def test_a_crash_before_the_completion_redelivers_and_loses_no_followup(store: Store, tmp_path: Path) -> None:
    """The group's event is delivered, but the node stops before recording it:
    no follow-up was queued, and the next start delivers it again, with the
    same follow-up ids, and every server gets its post once."""
    net = Fediverse()
    clock = Clock()
    await follow(store, "one.example", "two.example")
    ap, engine, tasks = make_node(store, net, clock)
    got: list[Any] = []
    real_deliver = ap.deliver

    async def deliver_then_crash(batch: Any) -> Any:
        result = await real_deliver(batch)
        got.append(result)
        await asyncio.Event().wait()  # the process dies before it records the completion
        return result

    ap.deliver = deliver_then_crash  # type: ignore[method-assign]
    await post_to_club(store, engine, "survivor", created=clock.now)
    await until(lambda: bool(got), "the first delivery")
    await engine.stop()
    await tasks.close()
    assert {i.target.group for i in await store.outbox_page(CLUB, 0, 10)} == {"club"}  # still queued
    assert await store.outbox_groups() == [CLUB]  # and no follow-up yet
    first_ids = sorted(f.event_id for f in got[0].followups)
    assert len(first_ids) == 2

    _, engine2, tasks2 = make_node(store, net, clock)
    seen: list[str] = []
    engine2.hand_over = lambda items: (seen.extend(i.event_id for i in items), engine2.submit(items))[1]
    await engine2.start()
    await until(lambda: len(net.sent) == 2, "both servers' posts")
    assert sorted(net.sent) == [("one.example", "survivor"), ("two.example", "survivor")]
    assert sorted(seen) == first_ids  # the same follow-ups, by id
    await until(lambda: not engine2.pending(), "the queues to drain")
    await engine2.stop()
    await tasks2.close()
    assert await store.outbox_groups() == []


def test_mastodons_schedule_spans_days_and_says_what_is_permanent() -> None:
    mid = sum(MASTODON.delay(n, max_delay=300.0, rand=lambda lo, hi: 1.0) for n in range(1, 17))
    assert 1.5 * 86400 < mid < 4 * 86400  # the gateway's 300 s cap does not apply to it
    assert [MASTODON.permanent(s) for s in (400, 401, 403, 404, 408, 410, 422, 429, 500, 503)] == [
        True, False, True, True, False, True, True, False, False, False]


async def test_in_a_cluster_each_servers_queue_is_delivered_by_the_node_that_owns_it() -> None:
    """Two nodes on one PostgreSQL store, with no hints between them (each its
    own local bus): a group's event delivered by one node queues follow-ups
    that the owner of each server's queue finds and delivers."""
    with temp_database() as dsn:
        stores = [PostgresStore(dsn), PostgresStore(dsn)]
        for s in stores:
            await s.open()
        net = Fediverse()
        clock = Clock()
        nodes = []
        for name, s in zip(("a", "b"), stores):
            ap, engine, tasks = make_node(s, net, clock, node=name)
            cluster = Cluster(name, s, LocalBus(), engine, Metrics(), tasks, partitions=8, lease_ttl=2.0,
                              on_state=lambda: None)
            # as the gateway wires it: committed follow-ups wake their owners
            engine.hand_over = lambda items, c=cluster: c.announce({i.target for i in items})
            nodes.append((name, engine, tasks, cluster))
        for _, _, _, cluster in nodes:
            await cluster.start()
        for _, _, _, cluster in nodes:
            await cluster._tick()  # the second node's share is now fair: the first gives some back
        for _, _, _, cluster in nodes:
            await cluster._tick()
        owner = {p: name for name, _, _, cluster in nodes for p in cluster.owned}
        assert len(owner) == 8 and set(owner.values()) == {"a", "b"}
        club_owner = owner[partition_of(CLUB, 8)]
        # servers whose queues the other node owns, and one the group's owner owns
        hosts = [h for h in (f"s{n}.example" for n in range(200))
                 if owner[partition_of(GroupRef(FEDI, D.target_of(f"https://{h}/inbox")), 8)] != club_owner][:2]
        hosts += [h for h in (f"t{n}.example" for n in range(200))
                  if owner[partition_of(GroupRef(FEDI, D.target_of(f"https://{h}/inbox")), 8)] == club_owner][:1]
        await follow(stores[0], *hosts)
        await post_to_club(stores[0], None, "across", created=clock.now)  # found by the owner's poll
        await until(lambda: len(net.sent) == 3, "every server's post", seconds=20)
        expected = {("a" if owner[partition_of(GroupRef(FEDI, D.target_of(f"https://{h}/inbox")), 8)] == "a"
                     else "b", h) for h in hosts}
        assert set(net.by) == expected and len(net.by) == 3  # each by its queue's owner, once
        for _, engine, tasks, cluster in nodes:
            await engine.stop()
            await cluster.stop()
            await tasks.close()
        for s in stores:
            await s.close()
