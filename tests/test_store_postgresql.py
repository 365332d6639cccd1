"""What only the PostgreSQL store has (the shared contract is test_store_contract.py):
migrations in step with the SQLite dialect, the outbox horizon, several nodes
on one database (racing inserts, migrations, retried batches) and the cluster
leases. Each test gets a fresh database on the local server (tests/services.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.ids import EventId, GroupId, GroupRef, PlatformName
from gateway.store import open_store
from gateway.store import postgresql as pg
from gateway.store.base import ClusterView
from gateway.store.postgresql import PgTx, PostgresStore, unpack_seq
from gateway.store.sqlite import SqliteStore
from gateway.store.sqlite import migrations as sqlite_migrations
from tests.services import temp_database

P = PlatformName
E = EventId
G = GroupRef(PlatformName("b"), GroupId("g"))

MakeStore = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
def dsn() -> Iterator[str]:
    with temp_database() as url:
        yield url


@pytest.fixture
async def stores(dsn: str) -> AsyncIterator[MakeStore]:
    """``await stores(**options)``: an open PostgresStore over the test's database
    (call it again for another node); all closed at teardown."""
    made: list[PostgresStore] = []

    async def make(**options: Any) -> PostgresStore:
        s = PostgresStore(dsn, **options)
        await s.open()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


def _enqueue(target: GroupRef, event: str) -> Callable[[PgTx], int]:
    return lambda tx: tx.enqueue(target, E(event), "civic.message.created", P("a"), 1.0, None, event.encode())


# -- open_store ---------------------------------------------------------------------------------

async def test_open_store_selects_postgresql(dsn: str, tmp_path: Path) -> None:
    s = open_store(dsn)
    assert isinstance(s, PostgresStore)
    assert isinstance(open_store(dsn.replace("postgresql://", "postgres://", 1)), PostgresStore)
    assert isinstance(open_store(str(tmp_path / "x.db")), SqliteStore)
    await s.open()
    try:
        assert await s.setting("k", lambda: "v") == "v"
    finally:
        await s.close()


# -- migrations ---------------------------------------------------------------------------------

def test_migrations_in_step_with_sqlite() -> None:
    """One number (and name) per migration in both dialects."""
    sqlite_files = sorted(e.name for e in resources.files("gateway.store").joinpath("migrations").iterdir()
                          if e.name.endswith(".sql"))
    assert [(v, n) for v, n, _ in pg.migration_files()] == [(int(n[:4]), n) for n in sqlite_files]
    assert [v for v, _ in pg.migrations()] == [v for v, _ in sqlite_migrations()]


PG_ONLY_TABLES = {"cluster_nodes", "cluster_leases"}
PG_ONLY_COLUMNS = {("outbox", "tx")}
_FAMILY = {"text": "text", "integer": "integer", "bigint": "integer", "real": "real", "double precision": "real",
           "blob": "blob", "bytea": "blob"}
Schema = dict[str, list[tuple[str, str, bool, int]]]
"""table -> its columns in order: (name, type family, NOT NULL, position in the primary key or 0)."""


def _sqlite_schema(conn: sqlite3.Connection) -> Schema:
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                         " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    return {t: [(name, _FAMILY.get(typ.lower(), typ.lower()), bool(notnull) or pk > 0, pk)
                for _cid, name, typ, notnull, _default, pk in conn.execute(f"PRAGMA table_info({t})")]
            for t in tables}


async def _pg_schema(conn: asyncpg.Connection) -> Schema:
    keys = {(r[0], r[1]): r[2] for r in await conn.fetch(
        "SELECT k.table_name, k.column_name, k.ordinal_position FROM information_schema.table_constraints c"
        " JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name, table_name)"
        " WHERE c.constraint_type = 'PRIMARY KEY' AND c.table_schema = current_schema()")}
    out: Schema = {}
    for t, col, typ, nullable in await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"):
        if t in PG_ONLY_TABLES or (t, col) in PG_ONLY_COLUMNS:
            continue
        out.setdefault(t, []).append((col, _FAMILY.get(typ, typ), nullable == "NO", keys.get((t, col), 0)))
    return out


async def test_migrations_create_the_same_tables_step_by_step(dsn: str) -> None:
    """After each migration both dialects have the same tables and columns (names,
    order, type family, NOT NULL, primary key), PostgreSQL-only ones aside."""
    lite = sqlite3.connect(":memory:")
    conn = await asyncpg.connect(dsn)
    try:
        for (version, lite_sql), (pg_version, pg_sql) in zip(sqlite_migrations(), pg.migrations(), strict=True):
            assert version == pg_version
            lite.executescript(lite_sql)
            await conn.execute(pg_sql)
            assert _sqlite_schema(lite) == await _pg_schema(conn), f"after migration {version:04d}"
    finally:
        await conn.close()
        lite.close()


async def test_stores_migrate_to_the_same_schema(stores: MakeStore, dsn: str, tmp_path: Path) -> None:
    lite_store = SqliteStore(str(tmp_path / "s.db"))
    await lite_store.open()
    await lite_store.close()
    await stores()
    lite = sqlite3.connect(tmp_path / "s.db")
    conn = await asyncpg.connect(dsn)
    try:
        want = _sqlite_schema(lite)
        assert "schema_migrations" in want and "outbox" in want
        assert await _pg_schema(conn) == want
        assert {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                                               )} == set(want) | PG_ONLY_TABLES
    finally:
        await conn.close()
        lite.close()


async def test_stores_opening_together_migrate_once(dsn: str) -> None:
    nodes = [PostgresStore(dsn, pool=1) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in nodes))  # without the lock, CREATE TABLE would collide
    try:
        rows = await nodes[0].transact(lambda tx: tx.fetch("SELECT version FROM schema_migrations ORDER BY version"))
        assert [r[0] for r in rows] == [v for v, _ in pg.migrations()]
        await nodes[1].transact(_enqueue(G, "e1"))
        assert [i.event_id for i in await nodes[2].outbox_page(G, 0, 10)] == ["e1"]
    finally:
        for s in nodes:
            await s.close()


# -- the outbox horizon ------------------------------------------------------------------------

async def _hold_open_transaction(dsn: str, event: str) -> tuple[asyncpg.Connection, Any]:
    """Another node's transaction that has its id and inserted a row, not committed."""
    conn = await asyncpg.connect(dsn)
    tr = conn.transaction()
    await tr.start()
    await conn.fetchval("SELECT pg_current_xact_id()")
    await conn.execute("INSERT INTO outbox (platform, grp, event_id, type, origin, created, body)"
                       " VALUES ($1, $2, $3, 'civic.message.created', 'a', 1.0, $4)",
                       G.platform, G.group, event, event.encode())
    return conn, tr


async def test_outbox_page_returns_only_rows_below_the_horizon(stores: MakeStore, dsn: str) -> None:
    store = await stores(horizon_wait=0.05)
    conn, tr = await _hold_open_transaction(dsn, "early")
    try:
        later = await store.transact(_enqueue(G, "later"))  # committed, but after "early" began
        # Neither: "early" is not committed, and "later" is not final while "early" may still commit
        # behind it (a reader that took "later" and moved its cursor on would skip "early" for good).
        assert await store.outbox_page(G, 0, 10) == []
        assert await store.outbox_groups() == [G]
        await tr.commit()
    finally:
        await conn.close()
    page = await store.outbox_page(G, 0, 10)
    assert [i.event_id for i in page] == ["early", "later"]
    assert page[0].seq < page[1].seq == later
    early_tx, early_row = unpack_seq(page[0].seq)
    later_tx, later_row = unpack_seq(later)
    assert early_tx < later_tx and early_row < later_row
    assert await store.outbox_page(G, page[0].seq, 10) == page[1:]
    assert await store.outbox_page(G, later, 10) == []


async def test_outbox_order_is_commit_safe_not_seq_order(stores: MakeStore, dsn: str) -> None:
    """A transaction that began first but inserted last still comes first: the
    cursor never passes a row that could still appear."""
    store = await stores(horizon_wait=0.05)
    conn = await asyncpg.connect(dsn)
    try:
        tr = conn.transaction()
        await tr.start()
        await conn.fetchval("SELECT pg_current_xact_id()")
        first = await store.transact(_enqueue(G, "committed-first"))
        assert await store.outbox_page(G, 0, 10) == []
        await conn.execute("INSERT INTO outbox (platform, grp, event_id, type, origin, created, body)"
                           " VALUES ($1, $2, 'began-first', 'civic.message.created', 'a', 1.0, '\\x00')",
                           G.platform, G.group)
        await tr.commit()
    finally:
        await conn.close()
    page = await store.outbox_page(G, 0, 10)
    assert [i.event_id for i in page] == ["began-first", "committed-first"]
    assert unpack_seq(page[0].seq)[1] > unpack_seq(first)[1]  # its row seq is higher, its place is earlier
    assert page[1].seq == first


async def test_outbox_page_waits_for_transactions_running_at_the_call(stores: MakeStore, dsn: str) -> None:
    store = await stores(horizon_wait=5.0)
    conn, tr = await _hold_open_transaction(dsn, "early")
    try:
        await store.transact(_enqueue(G, "later"))
        page = asyncio.ensure_future(store.outbox_page(G, 0, 10))
        await asyncio.sleep(0.2)
        assert not page.done()
        await tr.commit()
        assert [i.event_id for i in await asyncio.wait_for(page, 2.0)] == ["early", "later"]
    finally:
        await conn.close()


async def test_outbox_page_does_not_wait_when_full_or_idle(stores: MakeStore, dsn: str) -> None:
    store = await stores(horizon_wait=5.0)
    for i in range(3):
        await store.transact(_enqueue(G, f"e{i}"))
    started = time.monotonic()
    assert len(await store.outbox_page(G, 0, 10)) == 3
    conn, tr = await _hold_open_transaction(dsn, "open")
    try:
        assert len(await store.outbox_page(G, 0, 2)) == 2  # a full page is returned at once
        assert time.monotonic() - started < 1.0
    finally:
        await tr.rollback()
        await conn.close()


# -- several nodes on one database ----------------------------------------------------------------

async def test_first_seen_waits_for_the_other_node(stores: MakeStore) -> None:
    a, b = await stores(), await stores()
    for commit, answer in ((True, False), (False, True)):
        inserted, release = threading.Event(), threading.Event()
        event = E(f"e-{commit}")

        def hold(tx: PgTx) -> bool:
            assert tx.first_seen(P("p"), event, 1.0)
            inserted.set()
            release.wait(5)
            if not commit:
                raise RuntimeError("rolled back")
            return True

        first = asyncio.ensure_future(a.transact(hold))
        assert await asyncio.get_running_loop().run_in_executor(None, inserted.wait, 5)
        second = asyncio.ensure_future(b.transact(lambda tx: tx.first_seen(P("p"), event, 2.0)))
        await asyncio.sleep(0.2)
        assert not second.done()  # the unique index makes it wait for the other transaction
        release.set()
        if commit:
            assert await first is True
        else:
            with pytest.raises(RuntimeError):
                await first
        assert await second is answer


async def test_first_seen_racing_nodes_admit_each_event_once(stores: MakeStore) -> None:
    nodes = [await stores(), await stores()]
    calls = [nodes[i % 2].transact(lambda tx, i=i: tx.first_seen(P("p"), E(f"e{i // 4}"), 1.0)) for i in range(200)]
    results = await asyncio.gather(*calls)
    for k in range(50):
        assert sum(results[4 * k:4 * k + 4]) == 1


async def test_deadlocked_batch_is_run_again(stores: MakeStore) -> None:
    a, b = await stores(), await stores()
    barrier = threading.Barrier(2, timeout=5)
    runs = {"a": 0, "b": 0}

    def job(name: str, mine: str, theirs: str) -> Callable[[PgTx], tuple[bool, bool]]:
        def run(tx: PgTx) -> tuple[bool, bool]:
            runs[name] += 1
            tx.execute("SET LOCAL deadlock_timeout = '20ms'")
            first = tx.first_seen(P("p"), E(mine), 1.0)
            if runs[name] == 1:
                barrier.wait()  # both hold their own key, then want the other's
            return first, tx.first_seen(P("p"), E(theirs), 1.0)
        return run

    results = await asyncio.wait_for(asyncio.gather(a.transact(job("a", "k1", "k2")),
                                                    b.transact(job("b", "k2", "k1"))), 10)
    assert sorted(results) == [(False, False), (True, True)]  # the victim ran again, after the winner
    assert sorted(runs.values()) == [1, 2]
    assert a.backlog() == b.backlog() == 0


async def test_lost_connection_batch_is_run_again(stores: MakeStore, dsn: str) -> None:
    store = await stores(pool=1)
    runs = 0

    def dies_once(tx: PgTx) -> bool:
        nonlocal runs
        runs += 1
        seen = tx.first_seen(P("p"), E("x"), 1.0)
        if runs == 1:
            tx.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return seen

    assert await asyncio.wait_for(store.transact(dies_once), 10) is True  # the first run never committed
    assert runs == 2
    pid = await store.transact(lambda tx: tx.fetchval("SELECT pg_backend_pid()"))
    killer = await asyncpg.connect(dsn)
    try:
        assert await killer.fetchval("SELECT pg_terminate_backend($1, 2000)", pid)
    finally:
        await killer.close()
    assert await asyncio.wait_for(store.transact(lambda tx: tx.first_seen(P("p"), E("x"), 2.0)), 10) is False
    assert await store.transact(lambda tx: tx.fetchval("SELECT pg_backend_pid()")) != pid


# -- cluster leases ---------------------------------------------------------------------------------

async def _round(store: PostgresStore, nodes: list[str], partitions: int, ttl: float,
                 views: dict[str, ClusterView]) -> dict[str, ClusterView]:
    for n in nodes:
        views[n] = await store.cluster_tick(n, partitions, ttl)
    return views


def _assert_split(views: dict[str, ClusterView], partitions: int) -> None:
    owned = [v.owned for v in views.values()]
    assert sum(len(o) for o in owned) == partitions and frozenset().union(*owned) == set(range(partitions))
    assert max(len(o) for o in owned) == -(-partitions // len(views))  # nobody above the fair share


async def test_nodes_split_partitions_evenly(stores: MakeStore) -> None:
    store = await stores()
    views: dict[str, ClusterView] = {}
    await _round(store, ["a", "b", "c"], 8, 30.0, views)
    await _round(store, ["a", "b", "c"], 8, 30.0, views)
    _assert_split(views, 8)
    assert sorted(len(v.owned) for v in views.values()) == [2, 3, 3]
    assert all(v.nodes == ("a", "b", "c") for v in views.values())
    assert await store.cluster_owners() == {p: n for n, v in views.items() for p in v.owned}
    before = dict(views)
    await _round(store, ["a", "b", "c"], 8, 30.0, views)
    assert {n: v.owned for n, v in views.items()} == {n: v.owned for n, v in before.items()}  # stable
    assert all(views[n].epoch > before[n].epoch for n in views)


async def test_nodes_ticking_at_once_stay_disjoint(stores: MakeStore) -> None:
    nodes = {n: await stores(pool=1) for n in ("a", "b", "c")}
    views: dict[str, ClusterView] = {}
    for _ in range(4):
        for n, v in zip(nodes, await asyncio.gather(*(s.cluster_tick(n, 64, 30.0) for n, s in nodes.items()))):
            views[n] = v
        owned = [v.owned for v in views.values()]
        assert sum(len(o) for o in owned) == len(frozenset().union(*owned))
    _assert_split(views, 64)


async def test_dead_node_partitions_move_and_come_back(stores: MakeStore) -> None:
    store = await stores()
    ttl = 0.4
    views: dict[str, ClusterView] = {}
    for _ in range(2):
        await _round(store, ["a", "b", "c"], 8, ttl, views)
    _assert_split(views, 8)
    kept = {n: views[n].owned for n in ("a", "b")}
    c_gone = time.monotonic() + ttl + 0.05  # c stops ticking now; a and b go on
    while time.monotonic() < c_gone:
        await asyncio.sleep(ttl / 4)
        await _round(store, ["a", "b"], 8, ttl, views)
    del views["c"]
    await _round(store, ["a", "b"], 8, ttl, views)  # one more tick each
    _assert_split(views, 8)
    assert all(kept[n] <= views[n].owned for n in ("a", "b"))
    assert views["a"].nodes == ("a", "b")

    views["c"] = await store.cluster_tick("c", 8, ttl)  # back: nothing free yet, but a and b see it
    assert views["c"].owned == frozenset() and views["c"].nodes == ("a", "b", "c")
    await _round(store, ["a", "b", "c"], 8, ttl, views)
    _assert_split(views, 8)
    assert len(views["c"].owned) == 2


async def test_node_that_missed_renewals_owns_nothing(stores: MakeStore) -> None:
    store = await stores()
    ttl = 0.3
    assert (await store.cluster_tick("a", 4, ttl)).owned == {0, 1, 2, 3}
    await asyncio.sleep(ttl + 0.05)  # a stalls; its leases expire
    assert (await store.cluster_tick("b", 4, ttl)).owned == {0, 1, 2, 3}
    late = await store.cluster_tick("a", 4, ttl)
    assert late.owned == frozenset() and late.nodes == ("a", "b")
    assert set((await store.cluster_owners()).values()) == {"b"}
    assert len((await store.cluster_tick("b", 4, ttl)).owned) == 2  # gives a its share
    assert len((await store.cluster_tick("a", 4, ttl)).owned) == 2


async def test_cluster_leave_frees_at_once(stores: MakeStore) -> None:
    store = await stores()
    views: dict[str, ClusterView] = {}
    for _ in range(2):
        await _round(store, ["a", "b"], 6, 30.0, views)
    assert sorted(len(v.owned) for v in views.values()) == [3, 3]
    await store.cluster_leave("a")
    assert await store.cluster_owners() == {p: "b" for p in views["b"].owned}
    after = await store.cluster_tick("b", 6, 30.0)
    assert after.owned == set(range(6)) and after.nodes == ("b",)


async def test_sqlite_store_has_no_cluster(tmp_path: Path) -> None:
    s = SqliteStore(str(tmp_path / "s.db"))
    for call in (s.cluster_tick("a", 4, 5.0), s.cluster_leave("a"), s.cluster_owners()):
        with pytest.raises(NotImplementedError, match="a cluster needs a PostgreSQL store"):
            await call


async def test_close_finishes_queued_jobs(stores: MakeStore) -> None:
    store = await stores()
    calls = [asyncio.ensure_future(store.transact(lambda tx, i=i: tx.first_seen(P("p"), E(f"e{i}"), 1.0)))
             for i in range(300)]
    await asyncio.sleep(0)
    await store.close()
    assert all(c.done() and c.result() is True for c in calls)
    assert store.backlog() == 0
    with pytest.raises(RuntimeError, match="not open"):
        await store.transact(lambda tx: None)
