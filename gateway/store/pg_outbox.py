"""The PostgreSQL store's outbox and dead letters (``PgOutbox``, a mixin of
``PostgresStore``): paging below the outbox horizon, completing, dead-lettering
and replaying rows. See ``gateway.store.postgresql``, "The outbox horizon"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import msgspec

from gateway.ids import GroupId, GroupRef, NativeId, PlatformName
from gateway.store.base import DeadLetter, Mapping, OutboxItem
from gateway.store.pg_tx import _OUTBOX_COLS, SEQ_MASK, PgJobs, PgTx, _item, pack_seq, unpack_seq

HORIZON_WAIT = 1.0
"""Longest time ``outbox_page`` waits for transactions that were running when it
was called to finish (their rows, once final, belong in the page)."""
_OUTBOX_GROUPS = """
WITH RECURSIVE g AS (
    (SELECT platform, grp FROM outbox ORDER BY platform, grp LIMIT 1)
    UNION ALL
    SELECT n.platform, n.grp FROM g, LATERAL (
        SELECT o.platform, o.grp FROM outbox o WHERE (o.platform, o.grp) > (g.platform, g.grp)
        ORDER BY o.platform, o.grp LIMIT 1) n
)
SELECT platform, grp FROM g"""
"""The groups with undelivered rows, one index probe per group (every node asks
every second; ``SELECT DISTINCT`` would read the whole index of a big backlog)."""
_SNAPSHOT = "SELECT pg_snapshot_xmin(s), pg_snapshot_xmax(s) FROM pg_current_snapshot() AS s"
_PAGE = (f"SELECT {_OUTBOX_COLS}, tx FROM outbox WHERE platform = $1 AND grp = $2"
         " AND tx < pg_snapshot_xmin(pg_current_snapshot()) AND (tx, seq) > ($3::xid8, $4::bigint)"
         " ORDER BY tx, seq LIMIT $5")


class PgOutbox(PgJobs):
    """Outbox rows, their id mappings on completion, and dead letters."""

    horizon_wait: float

    async def outbox_groups(self) -> list[GroupRef]:
        rows = await self._submit(lambda tx: tx.fetch(_OUTBOX_GROUPS))
        return [GroupRef(PlatformName(p), GroupId(g)) for p, g in rows]

    async def outbox_page(self, target: GroupRef, after_seq: int, limit: int) -> list[OutboxItem]:
        """Rows of the group after the packed position ``after_seq``, in
        ``(tx, seq)`` order, only from transactions below the horizon of every
        running one. When the page is short because transactions that were
        already running at the call have not finished, it waits for them (at
        most ``horizon_wait`` seconds, off the workers) and reads again, so a
        page holds every row committed before the call (up to ``limit``)."""
        after_tx, after_row = unpack_seq(after_seq)

        def run(tx: PgTx) -> tuple[int, int, list[OutboxItem]]:
            xmin, xmax = tx.fetchrow(_SNAPSHOT)
            rows = tx.fetch(_PAGE, target.platform, target.group, after_tx, after_row, limit)
            return xmin, xmax, [_item(r, pack_seq(r[10], r[0])) for r in rows]

        deadline = time.monotonic() + self.horizon_wait
        wait_for: int | None = None
        pause = 0.002
        while True:
            xmin, xmax, items = await self._submit(run)
            if wait_for is None:
                wait_for = xmax  # every transaction that committed before this call has a lower id
            if len(items) >= limit or xmin >= wait_for or time.monotonic() >= deadline:
                return items
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def outbox_counts(self) -> dict[PlatformName, int]:
        rows = await self._submit(lambda tx: tx.fetch("SELECT platform, count(*) FROM outbox GROUP BY platform"))
        return {PlatformName(p): n for p, n in rows}

    async def complete(self, seqs: Sequence[int], mappings: Sequence[Mapping],
                       followups: Sequence[OutboxItem] = ()) -> list[OutboxItem]:
        rows = [s & SEQ_MASK for s in seqs]
        # One order on every node, so two nodes recording the same ids cannot deadlock.
        maps = sorted({(m.platform, m.grp, m.kind, m.native, m.canonical) for m in mappings})

        def run(tx: PgTx) -> list[OutboxItem]:
            if rows:
                tx.execute("DELETE FROM outbox WHERE seq = ANY($1::bigint[])", rows)
            if maps:
                tx.executemany("INSERT INTO id_map (platform, grp, kind, native, canonical, sent)"
                               " VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT DO NOTHING", maps)
            return [msgspec.structs.replace(f, seq=tx.enqueue(f.target, f.event_id, f.type, f.origin, f.created,
                                                              f.pending, f.body, f.occurred)) for f in followups]
        return await self._submit(run)

    async def natives(self, platform: PlatformName, grp: str, kind: str,
                      canonicals: Sequence[str]) -> dict[str, tuple[NativeId, int]]:
        rows = await self._submit(lambda tx: tx.fetch(
            "SELECT DISTINCT ON (canonical) canonical, native, sent FROM id_map WHERE canonical = ANY($1::text[])"
            " AND platform = $2 AND grp = $3 AND kind = $4 ORDER BY canonical, sent",
            list(canonicals), platform, grp, kind))
        return {r[0]: (NativeId(r[1]), r[2]) for r in rows}

    async def dead_letter(self, item: OutboxItem, error: str, attempts: int, now: float) -> None:
        row_seq = item.seq & SEQ_MASK

        def run(tx: PgTx) -> None:
            tx.execute("DELETE FROM outbox WHERE seq = $1", row_seq)
            tx.execute(f"INSERT INTO dead_letters ({_OUTBOX_COLS}, error, attempts, failed_at)"
                       " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (seq) DO UPDATE"
                       " SET platform = EXCLUDED.platform, grp = EXCLUDED.grp, event_id = EXCLUDED.event_id,"
                       " type = EXCLUDED.type, origin = EXCLUDED.origin, created = EXCLUDED.created,"
                       " pending = EXCLUDED.pending, body = EXCLUDED.body, occurred = EXCLUDED.occurred,"
                       " error = EXCLUDED.error, attempts = EXCLUDED.attempts, failed_at = EXCLUDED.failed_at",
                       row_seq, item.target.platform, item.target.group, item.event_id, item.type, item.origin,
                       item.created, item.pending, item.body, item.occurred, error[:2000], attempts, now)
        await self._submit(run)

    async def dead_letters(self, after_seq: int = 0, limit: int = 100) -> list[DeadLetter]:
        rows = await self._submit(lambda tx: tx.fetch(
            f"SELECT {_OUTBOX_COLS}, error, attempts, failed_at FROM dead_letters WHERE seq > $1"
            " ORDER BY seq LIMIT $2", after_seq, limit))
        return [DeadLetter(item=_item(r), error=r[10], attempts=r[11], failed_at=r[12]) for r in rows]

    async def dead_letter_count(self) -> int:
        return int(await self._submit(lambda tx: tx.fetchval("SELECT count(*) FROM dead_letters")))

    async def replay(self, seqs: Sequence[int] | None) -> list[OutboxItem]:
        wanted = None if seqs is None else list(dict.fromkeys(int(s) for s in seqs))

        def run(tx: PgTx) -> list[OutboxItem]:
            # DELETE ... RETURNING takes each row once even if two nodes replay at once.
            if wanted is None:
                rows = sorted(tx.fetch(f"DELETE FROM dead_letters RETURNING {_OUTBOX_COLS}"), key=lambda r: r[0])
            else:
                order = {s: i for i, s in enumerate(wanted)}
                rows = sorted(tx.fetch(f"DELETE FROM dead_letters WHERE seq = ANY($1::bigint[])"
                                       f" RETURNING {_OUTBOX_COLS}", wanted), key=lambda r: order[r[0]])
            items = []
            for r in rows:
                old = _item(r)
                seq = tx.enqueue(old.target, old.event_id, old.type, old.origin, old.created, old.pending, old.body,
                                 old.occurred)
                items.append(msgspec.structs.replace(old, seq=seq))
            return items
        return await self._submit(run)
