"""The store contract (STYLE.md point 9): one suite, run over every backend.

Every test talks to the public ``Store`` / ``Tx`` interface only. To add a
backend, add an entry to ``BACKENDS``: the storage of one test (a directory,
a fresh PostgreSQL database), how to make a store over it (the same storage on
every call, for reopening), and how to read a membership row (``Store`` has no
reader for memberships, so that one probe is per backend).

Outbox ``seq`` values are opaque increasing ints: compare them, never compute
with them. Dead letters are numbered by ``dead_letters()`` (the numbers
``replay`` takes), which need not be the outbox positions they came from.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway import ids
from gateway.ids import ACTOR, MESSAGE, CanonicalId, EventId, GroupId, GroupRef, LinkName, PlatformName
from gateway.store import postgresql
from gateway.store.base import Mapping, ModerationEntry, OutboxItem, SchemaTooNew, Store, Tx
from gateway.store.postgresql import PgTx, PostgresStore
from gateway.store.sqlite import SqliteStore, migrations
from tests.services import temp_database

P = PlatformName
C = CanonicalId
E = EventId


def G(platform: str, group: str) -> GroupRef:
    return GroupRef(PlatformName(platform), GroupId(group))


# -- backends -------------------------------------------------------------------------

def _sqlite_membership(tx: Any, platform: str, grp: str, actor: str) -> tuple[str, str | None] | None:
    row = tx.c.execute("SELECT state, role FROM memberships WHERE platform = ? AND grp = ? AND actor = ?",
                       (platform, grp, actor)).fetchone()
    return (row[0], row[1]) if row else None


def _pg_membership(tx: Any, platform: str, grp: str, actor: str) -> tuple[str, str | None] | None:
    assert isinstance(tx, PgTx)
    row = tx.fetchrow("SELECT state, role FROM memberships WHERE platform = $1 AND grp = $2 AND actor = $3",
                      platform, grp, actor)
    return (row[0], row[1]) if row else None


def _directory(d: Path) -> AbstractContextManager[Any]:
    return contextlib.nullcontext(d)


@dataclass(frozen=True)
class Backend:
    make: Callable[[Any], Store]
    """A new, unopened store over the storage belonging to one test (same storage on every call)."""
    membership: Callable[[Any, str, str, str], tuple[str, str | None] | None]
    """Read (state, role) of a membership inside a transaction."""
    storage: Callable[[Path], AbstractContextManager[Any]] = field(default=_directory)
    """The storage of one test, given its temporary directory (released afterwards)."""


BACKENDS: dict[str, Backend] = {
    "sqlite-inline": Backend(lambda d: SqliteStore(str(d / "s.db"), synchronous="normal"), _sqlite_membership),
    "sqlite-thread": Backend(lambda d: SqliteStore(str(d / "s.db"), synchronous="full"), _sqlite_membership),
    "postgresql": Backend(lambda dsn: PostgresStore(dsn), _pg_membership, lambda _d: temp_database()),
}


@pytest.fixture
def opened() -> list[Store]:
    """Stores a test opened and has not closed yet (closed at teardown)."""
    return []


@pytest.fixture
def storage() -> list[Any]:
    """The storage the test's store lives in (set by ``store``)."""
    return []


@pytest.fixture(params=list(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path, opened: list[Store],
                storage: list[Any]) -> AsyncIterator[Store]:
    backend = BACKENDS[request.param]
    with backend.storage(tmp_path) as where:
        storage.append(where)
        s = backend.make(where)
        await s.open()
        opened.append(s)
        try:
            yield s
        finally:
            while opened:
                await opened.pop().close()


@pytest.fixture
def backend_name(request: pytest.FixtureRequest, store: Store) -> str:
    return str(request.node.callspec.params["store"])


@pytest.fixture
def backend(backend_name: str) -> Backend:
    return BACKENDS[backend_name]


@pytest.fixture
def reopen(backend: Backend, storage: list[Any], opened: list[Store]) -> Callable[[Store | None], Awaitable[Store]]:
    """``await reopen(old)``: close ``old`` (unless None) and open a new store over the same data."""

    async def run(old: Store | None) -> Store:
        if old is not None:
            opened.remove(old)
            await old.close()
        s = backend.make(storage[0])
        await s.open()
        opened.append(s)
        return s

    return run


async def enqueue(store: Store, target: GroupRef, n: int = 1, *, origin: str = "src",
                  pending: str | None = None) -> list[int]:
    def run(tx: Tx) -> list[int]:
        return [tx.enqueue(target, ids.new_event_id(), "civic.message.created", P(origin),
                           1000.0 + i, pending, f"body-{i}".encode()) for i in range(n)]
    return await store.transact(run)


# -- migrations and durability -----------------------------------------------------------

def test_migrations_numbered_in_order() -> None:
    versions = [v for v, _ in migrations()]
    assert versions == list(range(1, len(versions) + 1)) and len(versions) >= 2


async def test_migrations_idempotent_and_data_survives_reopen(store: Store, reopen: Any) -> None:
    await store.transact(lambda tx: tx.map(P("a"), "g", MESSAGE, "n1", C("c1"), ids.ORIGIN))
    await store.transact(lambda tx: tx.first_seen(P("a"), E("e1"), 1.0))
    seq = (await enqueue(store, G("b", "g")))[0]
    value = await store.setting("k", lambda: "v1")

    s2 = await reopen(store)  # migrations run again: must skip what is applied
    assert await s2.transact(lambda tx: tx.lookup(P("a"), "g", MESSAGE, "n1")) == (C("c1"), ids.ORIGIN)
    assert await s2.transact(lambda tx: tx.first_seen(P("a"), E("e1"), 2.0)) is False
    assert [i.seq for i in await s2.outbox_page(G("b", "g"), 0, 10)] == [seq]
    assert await s2.setting("k", lambda: "other") == value
    await s2.transact(lambda tx: tx.map(P("a"), "g", MESSAGE, "n2", C("c2"), ids.COPY))

    s3 = await reopen(s2)
    assert await s3.transact(lambda tx: tx.lookup(P("a"), "g", MESSAGE, "n2")) == (C("c2"), ids.COPY)
    assert [i.seq for i in await s3.outbox_page(G("b", "g"), 0, 10)] == [seq]


def _record_migration(tx: Any, version: int) -> None:
    """What a newer civic-gateway's migration leaves behind: its number in schema_migrations."""
    if isinstance(tx, PgTx):
        tx.execute("INSERT INTO schema_migrations (version, applied) VALUES ($1, 0)", version)
    else:
        tx.c.execute("INSERT INTO schema_migrations (version, applied) VALUES (?, 0)", (version,))


async def test_a_database_written_by_a_newer_version_is_refused(store: Store, reopen: Any) -> None:
    """An older gateway must not run on (or migrate) tables a newer one changed: open fails and says what to do."""
    known = migrations()[-1][0]
    assert postgresql.migrations()[-1][0] == known  # both dialects know the same numbers
    await store.transact(lambda tx: tx.map(P("a"), "g", MESSAGE, "n1", C("c1"), ids.ORIGIN))
    await store.transact(lambda tx: _record_migration(tx, known + 2))
    with pytest.raises(SchemaTooNew) as info:
        await reopen(store)
    assert str(info.value) == (f"this database was written by a newer civic-gateway (schema {known + 2}, "
                               f"this version knows up to {known}): upgrade civic-gateway or restore a backup")


async def test_transact_is_committed_when_it_returns(store: Store, reopen: Any) -> None:
    """A second store over the same data (while the first stays open) sees the write."""
    await store.transact(lambda tx: tx.map(P("a"), "g", MESSAGE, "n", C("c"), ids.ORIGIN))
    other = await reopen(None)
    assert await other.transact(lambda tx: tx.lookup(P("a"), "g", MESSAGE, "n")) == (C("c"), ids.ORIGIN)


# -- Tx: dedup, id map, aliases --------------------------------------------------------------

async def test_first_seen_per_platform(store: Store) -> None:
    def run(tx: Tx) -> list[bool]:
        return [tx.first_seen(P("a"), E("e"), 1.0), tx.first_seen(P("a"), E("e"), 2.0),
                tx.first_seen(P("b"), E("e"), 1.0), tx.first_seen(P("a"), E("f"), 1.0)]
    assert await store.transact(run) == [True, False, True, True]
    assert await store.transact(lambda tx: tx.first_seen(P("a"), E("e"), 3.0)) is False
    assert await store.transact(lambda tx: tx.first_seen(P("b"), E("f"), 3.0)) is True


async def test_map_and_lookup(store: Store) -> None:
    def run(tx: Tx) -> list[Any]:
        return [tx.map(P("a"), "g", MESSAGE, "n", C("c1"), ids.SENT),
                tx.map(P("a"), "g", MESSAGE, "n", C("c2"), ids.ORIGIN),
                tx.lookup(P("a"), "g", MESSAGE, "n"),
                tx.lookup(P("a"), "g", MESSAGE, "missing"),
                tx.lookup(P("a"), "g", ACTOR, "n"),
                tx.lookup(P("b"), "g", MESSAGE, "n")]
    assert await store.transact(run) == [True, False, (C("c1"), ids.SENT), None, None, None]
    # in a later transaction too: the old row is kept
    assert await store.transact(lambda tx: tx.map(P("a"), "g", MESSAGE, "n", C("c3"), ids.COPY)) is False
    assert await store.transact(lambda tx: tx.lookup(P("a"), "g", MESSAGE, "n")) == (C("c1"), ids.SENT)
    assert await store.transact(lambda tx: tx.native_for(C("c2"), P("a"), "g", MESSAGE)) is None


async def test_map_is_scoped_by_group_and_kind(store: Store) -> None:
    def run(tx: Tx) -> list[Any]:
        return [tx.map(P("a"), "g1", MESSAGE, "n", C("c1"), ids.ORIGIN),
                tx.map(P("a"), "g2", MESSAGE, "n", C("c2"), ids.ORIGIN),
                tx.map(P("a"), "", ACTOR, "n", C("c3"), ids.ORIGIN)]
    assert await store.transact(run) == [True, True, True]

    def read(tx: Tx) -> list[Any]:
        return [tx.lookup(P("a"), "g1", MESSAGE, "n"), tx.lookup(P("a"), "g2", MESSAGE, "n"),
                tx.lookup(P("a"), "", ACTOR, "n"), tx.lookup(P("a"), "", MESSAGE, "n"),
                tx.native_for(C("c1"), P("a"), "g2", MESSAGE), tx.native_for(C("c2"), P("a"), "g2", MESSAGE)]
    assert await store.transact(read) == [(C("c1"), ids.ORIGIN), (C("c2"), ids.ORIGIN), (C("c3"), ids.ORIGIN),
                                          None, None, ("n", ids.ORIGIN)]


async def test_native_for_prefers_origin_then_copy_then_sent(store: Store) -> None:
    assert (ids.ORIGIN, ids.COPY, ids.SENT) == (0, 1, 2)

    def run(tx: Tx) -> None:
        c = C("c")
        # inserted worst first, so insertion order cannot explain the answer
        for grp, hows in (("g3", (ids.SENT, ids.COPY, ids.ORIGIN)), ("g2", (ids.SENT, ids.COPY)), ("g1", (ids.SENT,))):
            for how in hows:
                assert tx.map(P("a"), grp, MESSAGE, f"{grp}-{how}", c, how)

    await store.transact(run)

    def read(tx: Tx) -> list[Any]:
        return [tx.native_for(C("c"), P("a"), g, MESSAGE) for g in ("g3", "g2", "g1", "g0")]
    assert await store.transact(read) == [("g3-0", ids.ORIGIN), ("g2-1", ids.COPY), ("g1-2", ids.SENT), None]
    assert await store.natives(P("a"), "g3", MESSAGE, ["c", "nope"]) == {"c": ("g3-0", ids.ORIGIN)}
    assert await store.natives(P("a"), "g2", MESSAGE, ["c"]) == {"c": ("g2-1", ids.COPY)}


async def test_remap_repoints_and_makes_origin(store: Store) -> None:
    await store.transact(lambda tx: tx.map(P("a"), "", ACTOR, "u", C("old"), ids.SENT))
    await store.transact(lambda tx: tx.remap(P("a"), "", ACTOR, "u", C("new")))

    def read(tx: Tx) -> list[Any]:
        return [tx.lookup(P("a"), "", ACTOR, "u"), tx.native_for(C("new"), P("a"), "", ACTOR),
                tx.native_for(C("old"), P("a"), "", ACTOR)]
    assert await store.transact(read) == [(C("new"), ids.ORIGIN), ("u", ids.ORIGIN), None]
    # a native id never seen before is created, as ORIGIN
    await store.transact(lambda tx: tx.remap(P("a"), "", ACTOR, "v", C("cv")))
    assert await store.transact(lambda tx: tx.lookup(P("a"), "", ACTOR, "v")) == (C("cv"), ids.ORIGIN)


async def test_aliases(store: Store) -> None:
    assert await store.transact(lambda tx: tx.has_alias(P("a"), "new", "b", "old")) is False
    await store.transact(lambda tx: tx.declare_alias(P("a"), "new", "b", "old", 1.0))
    await store.transact(lambda tx: tx.declare_alias(P("a"), "new", "b", "old", 2.0))  # again: no error

    def read(tx: Tx) -> list[bool]:
        return [tx.has_alias(P("a"), "new", "b", "old"), tx.has_alias(P("b"), "old", "a", "new"),
                tx.has_alias(P("a"), "new", "c", "old"), tx.has_alias(P("a"), "new", "b", "other")]
    assert await store.transact(read) == [True, False, False, False]


# -- outbox -------------------------------------------------------------------------------

async def test_enqueue_and_outbox_pages(store: Store) -> None:
    g1, g2, g3 = G("b", "g1"), G("b", "g2"), G("c", "g1")
    seqs: list[int] = []
    for target in (g1, g2, g1, g3, g1, g1):
        seqs += await enqueue(store, target)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    page = await store.outbox_page(g1, 0, 100)
    assert [i.seq for i in page] == [seqs[0], seqs[2], seqs[4], seqs[5]]
    assert all(i.target == g1 for i in page)
    assert [i.seq for i in await store.outbox_page(g1, seqs[2], 100)] == [seqs[4], seqs[5]]
    assert [i.seq for i in await store.outbox_page(g1, 0, 2)] == [seqs[0], seqs[2]]
    assert [i.seq for i in await store.outbox_page(g1, seqs[5], 100)] == []
    assert [i.seq for i in await store.outbox_page(G("b", "none"), 0, 100)] == []
    assert set(await store.outbox_groups()) == {g1, g2, g3}
    assert await store.outbox_counts() == {P("b"): 5, P("c"): 1}


async def test_outbox_item_round_trip(store: Store) -> None:
    target = G("b", "g")
    body = bytes(range(256))

    def run(tx: Tx) -> list[int]:
        return [tx.enqueue(target, E("e1"), "civic.message.created", P("a"), 12.5, "cgm_1 cgm_2", body),
                tx.enqueue(target, E("e2"), "civic.reaction.added", P("c"), 13.0, None, b"")]
    s1, s2 = await store.transact(run)
    assert s2 > s1
    assert await store.outbox_page(target, 0, 10) == [
        OutboxItem(s1, target, E("e1"), "civic.message.created", P("a"), 12.5, "cgm_1 cgm_2", body),
        OutboxItem(s2, target, E("e2"), "civic.reaction.added", P("c"), 13.0, None, b""),
    ]


async def test_complete_removes_rows_and_records_copies(store: Store) -> None:
    g = G("b", "g")
    seqs = await enqueue(store, g, 3)
    # the pipeline maps a stand-in (SENT) when it enqueues; delivery records the real id
    await store.transact(lambda tx: tx.map(P("b"), "g", MESSAGE, "cgm_x", C("cgm_x"), ids.SENT))
    await store.complete(seqs[:2], [Mapping(P("b"), GroupId("g"), MESSAGE, "native-x", C("cgm_x")),
                                    Mapping(P("b"), GroupId("g"), MESSAGE, "native-y", C("cgm_y"))])
    assert [i.seq for i in await store.outbox_page(g, 0, 10)] == [seqs[2]]
    assert await store.outbox_counts() == {P("b"): 1}
    assert await store.natives(P("b"), "g", MESSAGE, ["cgm_x", "cgm_y", "cgm_z"]) == {
        "cgm_x": ("native-x", ids.COPY), "cgm_y": ("native-y", ids.COPY)}

    def read(tx: Tx) -> list[Any]:
        return [tx.native_for(C("cgm_x"), P("b"), "g", MESSAGE), tx.lookup(P("b"), "g", MESSAGE, "native-y"),
                tx.native_for(C("cgm_x"), P("b"), "other", MESSAGE)]
    assert await store.transact(read) == [("native-x", ids.COPY), (C("cgm_y"), ids.COPY), None]

    await store.complete(seqs[2:], [])
    assert await store.outbox_page(g, 0, 10) == []
    assert await store.outbox_groups() == []
    assert sum((await store.outbox_counts()).values()) == 0


async def test_complete_queues_followups_with_the_completion(store: Store) -> None:
    """A delivery's follow-ups (``DeliveryResult.followups``) are queued in the
    transaction that records it: at the end of their groups' queues, in the
    order given, with the ids and bodies given; the row that asked is gone."""
    g = G("b", "club")
    seqs = await enqueue(store, g, 2)
    h1, h2 = G("b", "inbox:one.example"), G("b", "inbox:two.example")
    earlier = await enqueue(store, h1, 1)

    def row(target: GroupRef, n: int) -> OutboxItem:
        return OutboxItem(0, target, E(f"ap-post:{n}"), "activitypub.post", P("b"), 50.0 + n, None, b"\x00post %d" % n)
    asked = [row(h1, 1), row(h2, 2), row(h1, 3)]
    queued = await store.complete(seqs[:1], [], asked)
    assert [(i.target, i.event_id, i.type, i.body, i.created) for i in queued] == [
        (f.target, f.event_id, f.type, f.body, f.created) for f in asked]
    assert queued[0].seq > earlier[0] and queued[2].seq > queued[0].seq
    assert await store.outbox_page(h1, 0, 10) == [*await store.outbox_page(h1, 0, 1), queued[0], queued[2]]
    assert [i.event_id for i in await store.outbox_page(h1, 0, 10)][1:] == [E("ap-post:1"), E("ap-post:3")]
    assert await store.outbox_page(h2, 0, 10) == [queued[1]]
    assert queued[1].payload() == b"\x00post 2"  # an adapter's own type: the body as it is
    assert [i.seq for i in await store.outbox_page(g, 0, 10)] == [seqs[1]]
    assert sorted(await store.outbox_groups()) == sorted([g, h1, h2])
    assert await store.outbox_counts() == {P("b"): 5}
    assert await store.complete(seqs[1:], []) == []  # without follow-ups: nothing queued


# -- dead letters ---------------------------------------------------------------------------

async def test_dead_letter_and_listing(store: Store) -> None:
    g = G("b", "g")
    await enqueue(store, g, 3)
    items = await store.outbox_page(g, 0, 10)
    await store.dead_letter(items[0], "boom", 3, 50.0)
    await store.dead_letter(items[2], "bang", 7, 60.0)
    assert [i.seq for i in await store.outbox_page(g, 0, 10)] == [items[1].seq]
    assert await store.outbox_counts() == {P("b"): 1}
    assert await store.dead_letter_count() == 2

    dls = await store.dead_letters()
    # the outbox item as it was, under a dead-letter number of its own (what ``replay`` takes)
    assert [(_unnumbered(d.item), d.error, d.attempts, d.failed_at) for d in dls] == [
        (_unnumbered(items[0]), "boom", 3, 50.0), (_unnumbered(items[2]), "bang", 7, 60.0)]
    numbers = [d.item.seq for d in dls]
    assert numbers == sorted(numbers) and len(set(numbers)) == 2 and numbers[0] > 0
    if isinstance(store, SqliteStore):  # SQLite keeps the outbox seq
        assert numbers == [items[0].seq, items[2].seq]
    assert [d.item.seq for d in await store.dead_letters(after_seq=numbers[0])] == [numbers[1]]
    assert [d.item.seq for d in await store.dead_letters(limit=1)] == [numbers[0]]
    assert await store.dead_letters(after_seq=numbers[1]) == []


def _unnumbered(item: OutboxItem) -> OutboxItem:
    return msgspec.structs.replace(item, seq=0)


async def test_replay_all_moves_back_to_end_of_queue(store: Store) -> None:
    g, h = G("b", "g"), G("c", "h")
    await enqueue(store, g, 2, pending="cgm_p")
    await enqueue(store, h, 1)
    first, second = await store.outbox_page(g, 0, 10)
    (other,) = await store.outbox_page(h, 0, 10)
    await store.dead_letter(first, "e", 1, 1.0)
    await store.dead_letter(other, "e", 1, 1.0)
    later = (await enqueue(store, g))[0]

    replayed = await store.replay(None)
    assert await store.dead_letter_count() == 0
    assert sorted((i.event_id, i.body) for i in replayed) == sorted(
        [(first.event_id, first.body), (other.event_id, other.body)])
    for new in replayed:
        old = first if new.event_id == first.event_id else other
        assert new.seq > later
        assert (new.target, new.type, new.origin, new.created, new.pending) == (
            old.target, old.type, old.origin, old.created, old.pending)
    page = await store.outbox_page(g, 0, 10)
    assert [i.seq for i in page[:2]] == [second.seq, later]
    assert [(i.event_id, i.body, i.pending) for i in page[2:]] == [(first.event_id, first.body, "cgm_p")]
    assert [(i.event_id, i.body) for i in await store.outbox_page(h, 0, 10)] == [(other.event_id, other.body)]
    assert set(await store.outbox_groups()) == {g, h}


async def test_replay_selected(store: Store) -> None:
    g = G("b", "g")
    await enqueue(store, g, 3)
    items = await store.outbox_page(g, 0, 10)
    for it in items:
        await store.dead_letter(it, "e", 2, 1.0)
    dls = await store.dead_letters()
    assert [d.item.event_id for d in dls] == [i.event_id for i in items]
    numbers = [d.item.seq for d in dls]

    replayed = await store.replay([numbers[1]])
    assert [(i.event_id, i.body, i.target) for i in replayed] == [(items[1].event_id, items[1].body, g)]
    assert replayed[0].seq > items[2].seq
    assert await store.outbox_page(g, 0, 10) == replayed
    assert await store.dead_letter_count() == 2
    assert [(d.item.seq, d.item.event_id) for d in await store.dead_letters()] == [
        (numbers[0], items[0].event_id), (numbers[2], items[2].event_id)]
    assert await store.replay([numbers[1]]) == []  # already replayed
    assert await store.replay([]) == []
    assert await store.dead_letter_count() == 2


# -- memberships, moderation, bans, settings -------------------------------------------------

async def test_set_membership_upserts(store: Store, backend: Backend) -> None:
    a, grp = C("cga_1"), GroupId("g")

    def read(tx: Tx) -> Any:
        return backend.membership(tx, "p", grp, a)

    await store.transact(lambda tx: tx.set_membership(P("p"), grp, a, "joined", "moderator", 1.0))
    assert await store.transact(read) == ("joined", "moderator")
    await store.transact(lambda tx: tx.set_membership(P("p"), grp, a, "left", None, 2.0))
    assert await store.transact(read) == ("left", "moderator")  # no new role: the old one is kept
    await store.transact(lambda tx: tx.set_membership(P("p"), grp, a, "joined", "member", 3.0))
    assert await store.transact(read) == ("joined", "member")
    await store.transact(lambda tx: tx.set_membership(P("p"), GroupId("h"), a, "joined", None, 4.0))
    assert await store.transact(lambda tx: backend.membership(tx, "p", "h", a)) == ("joined", None)
    assert await store.transact(read) == ("joined", "member")


def _entry(i: int, link: str) -> ModerationEntry:
    return ModerationEntry(time=float(i), link=LinkName(link), platform=P("p"), grp=GroupId("g"), action="ban",
                           subject=f"cga_{i}", moderator=None if i % 2 else "Mod", reason=f"r{i}",
                           category=None, event_id=E(f"e{i}"),
                           subject_identity=("anonymous", "pseudonymous", "identified", None)[i % 4],
                           subject_name=f"name {i}" if i % 4 in (1, 2) else None,
                           moderator_identity=None if i % 2 else "identified")


async def test_moderation_log_paging_and_link_filter(store: Store) -> None:
    def run(tx: Tx) -> None:
        for i in range(6):
            tx.log_moderation(_entry(i, "l1" if i % 3 else "l2"))
    await store.transact(run)

    log = await store.moderation_log()
    assert [e.event_id for e in log] == [f"e{i}" for i in range(6)]
    seqs = [e.seq for e in log]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6 and seqs[0] > 0
    assert [msgspec.structs.replace(e, seq=0) for e in log] == [_entry(i, "l1" if i % 3 else "l2") for i in range(6)]

    assert [e.event_id for e in await store.moderation_log(after_seq=seqs[2], limit=2)] == ["e3", "e4"]
    assert [e.event_id for e in await store.moderation_log(link="l2")] == ["e0", "e3"]
    assert [e.event_id for e in await store.moderation_log(after_seq=seqs[0], link="l2")] == ["e3"]
    assert [e.event_id for e in await store.moderation_log(link="l1", limit=3)] == ["e1", "e2", "e4"]
    assert await store.moderation_log(link="none") == []


async def test_authorship_copies_and_consent(store: Store) -> None:
    assert await store.withdrawn() == set()

    def run(tx: Tx) -> None:
        tx.record_author(C("m1"), C("alice"))
        tx.record_author(C("m2"), C("alice"))
        tx.record_author(C("m1"), C("alice"))  # again: once
        tx.record_author(C("m3"), C("bob"))
        tx.map(P("a"), "g", MESSAGE, "n1", C("m1"), ids.ORIGIN)
        tx.map(P("b"), "g", MESSAGE, "m1", C("m1"), ids.SENT)
        tx.map(P("b"), "g", MESSAGE, "b-7", C("m1"), ids.COPY)
        tx.map(P("b"), "g", ACTOR, "m1", C("m1"), ids.SENT)  # another kind: not a copy of the message
        tx.set_consent(C("alice"), "withdrawn", 1.0)
        tx.set_consent(C("bob"), "withdrawn", 1.0)
        tx.set_consent(C("bob"), "granted", 2.0)
    await store.transact(run)
    assert sorted(await store.transact(lambda tx: tx.messages_by(C("alice")))) == ["m1", "m2"]
    assert await store.transact(lambda tx: tx.messages_by(C("carol"))) == []
    copies = await store.transact(lambda tx: tx.copies(C("m1"), MESSAGE))
    assert copies == [("a", "g", "n1", ids.ORIGIN), ("b", "g", "b-7", ids.COPY), ("b", "g", "m1", ids.SENT)]
    assert await store.withdrawn() == {C("alice")}


async def test_bans(store: Store) -> None:
    assert await store.bans() == set()

    def run(tx: Tx) -> None:
        tx.set_ban(LinkName("l1"), C("x"), True, 1.0)
        tx.set_ban(LinkName("l1"), C("x"), True, 2.0)  # again: still one ban
        tx.set_ban(LinkName("l2"), C("x"), True, 1.0)
        tx.set_ban(LinkName("l1"), C("y"), True, 1.0)
    await store.transact(run)
    assert await store.bans() == {(LinkName("l1"), C("x")), (LinkName("l2"), C("x")), (LinkName("l1"), C("y"))}
    await store.transact(lambda tx: tx.set_ban(LinkName("l1"), C("x"), False, 3.0))
    await store.transact(lambda tx: tx.set_ban(LinkName("l3"), C("z"), False, 3.0))  # unbanning nobody: no error
    assert await store.bans() == {(LinkName("l2"), C("x")), (LinkName("l1"), C("y"))}


async def test_setting_created_once_and_persistent(store: Store, reopen: Any) -> None:
    calls: list[str] = []

    def default() -> str:
        calls.append("x")
        return f"value-{len(calls)}"

    # concurrent first uses still agree on one value
    a, b = await asyncio.gather(store.setting("key", default), store.setting("key", default))
    assert a == b == "value-1" and calls == ["x"]
    assert await store.setting("key", default) == "value-1"
    assert await store.setting("other", lambda: "o") == "o"
    s2 = await reopen(store)
    assert await s2.setting("key", default) == "value-1"
    assert calls == ["x"]
    assert await s2.setting("other", lambda: "changed") == "o"


# -- pruning ------------------------------------------------------------------------------------

async def test_prune_processed(store: Store) -> None:
    def run(tx: Tx) -> None:
        for i in range(4500):
            assert tx.first_seen(P("a"), E(f"old{i}"), 100.0 + i * 0.01)
        for i in range(10):
            assert tx.first_seen(P("b"), E(f"new{i}"), 500.0 + i)
        for i in range(5):  # old again after new ones: the cut-off is by time, not by position
            assert tx.first_seen(P("c"), E(f"late-old{i}"), 150.0)
        assert tx.first_seen(P("a"), E("edge"), 500.0)  # exactly at the cut-off: kept
    await store.transact(run)

    assert await store.prune_processed(500.0) == 4505

    def read(tx: Tx) -> list[bool]:
        kept = [tx.first_seen(P("b"), E(f"new{i}"), 900.0) for i in range(10)] + [
            tx.first_seen(P("a"), E("edge"), 900.0)]
        gone = [tx.first_seen(P("a"), E(f"old{i}"), 900.0) for i in (0, 1999, 2000, 4499)] + [
            tx.first_seen(P("c"), E("late-old4"), 900.0)]
        return kept + gone
    assert await store.transact(read) == [False] * 11 + [True] * 5
    assert await store.prune_processed(500.0) == 0
    assert await store.prune_processed(1000.0) == 16


async def test_prune_processed_exact_step_multiple(store: Store) -> None:
    def run(tx: Tx) -> None:
        for i in range(4000):
            tx.first_seen(P("a"), E(f"e{i}"), 1.0)
    await store.transact(run)
    assert await store.prune_processed(2.0) == 4000
    assert await store.transact(lambda tx: tx.first_seen(P("a"), E("e3999"), 3.0)) is True


# -- transactions and group commit -----------------------------------------------------------------

class Boom(Exception):
    pass


async def test_failing_transact_rolls_back_only_itself(store: Store) -> None:
    g = G("b", "g")

    def bad(tx: Tx) -> None:
        tx.first_seen(P("a"), E("bad"), 1.0)
        tx.map(P("a"), "g", MESSAGE, "bad", C("cbad"), ids.ORIGIN)
        tx.enqueue(g, E("bad"), "t", P("a"), 1.0, None, b"bad")
        raise Boom("planned")

    def good(tx: Tx) -> int:
        assert tx.first_seen(P("a"), E("good"), 1.0)
        tx.map(P("a"), "g", MESSAGE, "good", C("cgood"), ids.ORIGIN)
        return tx.enqueue(g, E("good"), "t", P("a"), 1.0, None, b"good")

    results = await asyncio.gather(store.transact(good), store.transact(bad), store.transact(good),
                                   return_exceptions=True)
    assert isinstance(results[1], Boom) and str(results[1]) == "planned"
    # exactly one "good" commits; the other saw its dedup row and failed alone
    oks = [r for r in (results[0], results[2]) if isinstance(r, int)]
    assert len(oks) == 1 and any(isinstance(r, AssertionError) for r in (results[0], results[2]))

    def read(tx: Tx) -> list[Any]:
        return [tx.first_seen(P("a"), E("bad"), 2.0), tx.lookup(P("a"), "g", MESSAGE, "bad"),
                tx.first_seen(P("a"), E("good"), 2.0), tx.lookup(P("a"), "g", MESSAGE, "good")]
    assert await store.transact(read) == [True, None, False, (C("cgood"), ids.ORIGIN)]
    assert [(i.seq, i.body) for i in await store.outbox_page(g, 0, 10)] == [(oks[0], b"good")]

    with pytest.raises(Boom):
        await store.transact(bad)
    assert store.backlog() == 0


class Fatal(BaseException):
    """Not an ``Exception`` (like ``KeyboardInterrupt`` or ``SystemExit``)."""


async def test_base_exception_fails_only_its_own_transact(store: Store) -> None:
    def bad(tx: Tx) -> None:
        tx.first_seen(P("a"), E("bad"), 1.0)
        raise Fatal()

    results = await asyncio.wait_for(asyncio.gather(
        store.transact(lambda tx: tx.first_seen(P("a"), E("good"), 1.0)), store.transact(bad),
        return_exceptions=True), 0.5)
    assert results[0] is True and isinstance(results[1], Fatal)
    assert await asyncio.wait_for(store.transact(lambda tx: tx.first_seen(P("a"), E("good"), 2.0)), 0.5) is False


async def test_group_commit_200_concurrent(store: Store, backend_name: str) -> None:
    g = G("b", "g")
    before = getattr(store, "commits", None)
    if isinstance(store, SqliteStore):
        assert isinstance(before, int)

    def job(i: int) -> Callable[[Tx], int]:
        def run(tx: Tx) -> int:
            assert tx.first_seen(P("a"), E(f"e{i}"), 1.0)
            tx.map(P("a"), "g", MESSAGE, f"n{i}", C(f"c{i}"), ids.ORIGIN)
            return tx.enqueue(g, E(f"e{i}"), "t", P("a"), 1.0, None, str(i).encode())
        return run

    seqs = await asyncio.gather(*(store.transact(job(i)) for i in range(200)))
    assert len(set(seqs)) == 200
    page = await store.outbox_page(g, 0, 1000)
    assert sorted(i.seq for i in page) == sorted(seqs)
    assert {i.body for i in page} == {str(i).encode() for i in range(200)}

    def read(tx: Tx) -> list[Any]:
        return [tx.lookup(P("a"), "g", MESSAGE, f"n{i}") for i in range(200)]
    assert await store.transact(read) == [(C(f"c{i}"), ids.ORIGIN) for i in range(200)]
    if backend_name == "sqlite-inline":
        assert isinstance(store, SqliteStore)
        assert store.commits - before < 200  # type: ignore[operator]
        assert store.commits - before <= 4  # type: ignore[operator]  # 200 jobs, 1 batch (+ the reads)
    assert store.backlog() == 0


async def test_backlog_zero_when_idle(store: Store) -> None:
    assert store.backlog() == 0
    await asyncio.gather(*(store.transact(lambda tx, i=i: tx.first_seen(P("a"), E(f"e{i}"), 1.0)) for i in range(50)))
    await store.outbox_counts()
    assert store.backlog() == 0


async def test_sent_fingerprints_are_remembered_for_a_window_and_pruned(store: Store) -> None:
    a, b = b"\x01" * 16, b"\x02" * 16
    await store.transact(lambda tx: tx.remember_sent(a, 1000.0))
    await store.transact(lambda tx: tx.remember_sent(b, 1500.0))
    assert await store.transact(lambda tx: tx.sent_since(a, 900.0)) is True
    assert await store.transact(lambda tx: tx.sent_since(a, 1001.0)) is False, "older than the window"
    assert await store.transact(lambda tx: tx.sent_since(b"\x03" * 16, 0.0)) is False
    await store.transact(lambda tx: tx.remember_sent(a, 1000.0))  # the same one again: no error
    assert await store.prune_fingerprints(1200.0) == 1
    assert await store.transact(lambda tx: tx.sent_since(a, 0.0)) is False
    assert await store.transact(lambda tx: tx.sent_since(b, 0.0)) is True


# -- adapter state ------------------------------------------------------------------------------

async def test_adapter_state_put_get_overwrite_delete(store: Store, reopen: Any) -> None:
    assert await store.state_get("mx", ["a", "b"]) == {}
    await store.state_put("mx", {"a": b"1", "b": b"two", "c": b""}, 10.0)
    assert await store.state_get("mx", ["a", "b", "c", "missing"]) == {"a": b"1", "b": b"two", "c": b""}
    await store.state_put("mx", {"a": b"one", "b": None, "never-set": None}, 11.0)  # deleting nothing: no error
    assert await store.state_get("mx", ["a", "b", "c"]) == {"a": b"one", "c": b""}
    assert await store.state_get("mx", []) == {}
    await store.state_put("mx", {}, 12.0)
    s2 = await reopen(store)
    assert await s2.state_get("mx", ["a", "b", "c"]) == {"a": b"one", "c": b""}, "durable"


async def test_adapter_state_platforms_are_separate(store: Store) -> None:
    await store.state_put("mx", {"token": b"m"}, 1.0)
    await store.state_put("ap", {"token": b"a"}, 1.0)
    assert await store.state_get("mx", ["token"]) == {"token": b"m"}
    assert await store.state_get("ap", ["token"]) == {"token": b"a"}
    await store.state_put("ap", {"token": None}, 2.0)
    assert await store.state_get("ap", ["token"]) == {}
    assert await store.state_get("mx", ["token"]) == {"token": b"m"}
    assert await store.state_scan("other", "") == []


async def test_adapter_state_setdefault_keeps_the_first_value(store: Store) -> None:
    assert await store.state_setdefault("ap", "key", b"first", 1.0) == b"first"
    assert await store.state_setdefault("ap", "key", b"second", 2.0) == b"first"
    assert await store.state_get("ap", ["key"]) == {"key": b"first"}
    assert await store.state_setdefault("mx", "key", b"other", 3.0) == b"other"  # per platform


async def test_adapter_state_prune_deletes_old_keys_under_a_prefix_only(store: Store) -> None:
    await store.state_put("mx", {"r:old": b"1", "r:older": b"2", "keep:old": b"3"}, 10.0)
    await store.state_put("mx", {"r:new": b"4"}, 20.0)
    await store.state_put("ap", {"r:old": b"5"}, 10.0)
    assert await store.state_prune("mx", "r:", 15.0) == 2
    assert await store.state_scan("mx", "") == [("keep:old", b"3"), ("r:new", b"4")]
    assert await store.state_get("ap", ["r:old"]) == {"r:old": b"5"}, "another platform's keys stay"
    await store.state_put("mx", {"r:new": b"4b"}, 30.0)  # rewriting a key makes it new again
    assert await store.state_prune("mx", "r:", 25.0) == 0
    assert await store.state_prune("mx", "", 100.0) == 2


async def test_adapter_state_scan_by_prefix_in_key_order(store: Store) -> None:
    keys = ["room/b", "room/a", "room/a/x", "room0", "roo", "room/\u00e9", "room/Z", "room/\U0001f600", "zz"]
    await store.state_put("mx", {k: k.encode() for k in keys}, 1.0)
    await store.state_put("ap", {"room/c": b"elsewhere"}, 1.0)
    want = sorted(k for k in keys if k.startswith("room/"))  # code point order: "Z" < "a" < "é" < emoji
    assert want == ["room/Z", "room/a", "room/a/x", "room/b", "room/\u00e9", "room/\U0001f600"]
    assert await store.state_scan("mx", "room/") == [(k, k.encode()) for k in want]
    assert await store.state_scan("mx", "room/", limit=2) == [("room/Z", b"room/Z"), ("room/a", b"room/a")]
    assert [k for k, _ in await store.state_scan("mx", "")] == sorted(keys)
    assert await store.state_scan("mx", "room/a/") == [("room/a/x", b"room/a/x")]
    assert await store.state_scan("mx", "nothing") == []
    assert [k for k, _ in await store.state_scan("mx", "room")] == sorted(k for k in keys if k.startswith("room"))
    top = "\U0010ffff"  # a prefix ending in the highest code point has no upper bound of the same length
    await store.state_put("mx", {"x" + top: b"1", "x" + top + "y": b"2", "y": b"3"}, 1.0)
    assert [k for k, _ in await store.state_scan("mx", "x" + top)] == ["x" + top, "x" + top + "y"]


async def test_adapter_state_bytes_round_trip_and_key_limits(store: Store) -> None:
    values = {"nul": b"\x00", "mixed": b"a\x00b\xff\xfe\x00", "big": bytes(range(256)) * 64}
    await store.state_put("mx", values, 1.0)
    got = await store.state_get("mx", list(values))
    assert got == values and all(type(v) is bytes for v in got.values())
    assert dict(await store.state_scan("mx", "")) == values
    longest = "k" * 512
    await store.state_put("mx", {longest: b"ok"}, 1.0)
    assert await store.state_get("mx", [longest]) == {longest: b"ok"}
    with pytest.raises(ValueError, match="512"):
        await store.state_put("mx", {"k" * 513: b"too long"}, 1.0)
    with pytest.raises(ValueError, match="NUL"):
        await store.state_put("mx", {"a\x00b": b"x"}, 1.0)
