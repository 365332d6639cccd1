"""The SQLite store's outbox and dead letters (``SqliteOutbox``, a mixin of
``SqliteStore``): paging, completing, dead-lettering and replaying rows.
See ``gateway.store.sqlite``."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from gateway.ids import CanonicalId, GroupId, GroupRef, NativeId, PlatformName
from gateway.store.base import DeadLetter, Mapping, OutboxItem
from gateway.store.sqlite_tx import _OUTBOX_COLS, SqliteJobs, SqliteTx, _item


class SqliteOutbox(SqliteJobs):
    """Outbox rows, their id mappings on completion, and dead letters."""

    async def outbox_groups(self) -> list[GroupRef]:
        rows = await self._submit(lambda tx: tx.c.execute("SELECT DISTINCT platform, grp FROM outbox").fetchall())
        return [GroupRef(PlatformName(p), GroupId(g)) for p, g in rows]

    async def outbox_page(self, target: GroupRef, after_seq: int, limit: int) -> list[OutboxItem]:
        rows = await self._submit(lambda tx: tx.c.execute(
            f"SELECT {_OUTBOX_COLS} FROM outbox WHERE platform = ? AND grp = ? AND seq > ? ORDER BY seq LIMIT ?",
            (target.platform, target.group, after_seq, limit)).fetchall())
        return [_item(r) for r in rows]

    async def outbox_counts(self) -> dict[PlatformName, int]:
        rows = await self._submit(lambda tx: tx.c.execute(
            "SELECT platform, COUNT(*) FROM outbox GROUP BY platform").fetchall())
        return {PlatformName(p): n for p, n in rows}

    async def complete(self, seqs: Sequence[int], mappings: Sequence[Mapping],
                       followups: Sequence[OutboxItem] = ()) -> list[OutboxItem]:
        def run(tx: SqliteTx) -> list[OutboxItem]:
            tx.c.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
            if mappings:
                tx.c.executemany("INSERT OR IGNORE INTO id_map (platform, grp, kind, native, canonical, sent)"
                                 " VALUES (?, ?, ?, ?, ?, 1)",
                                 [(m.platform, m.grp, m.kind, m.native, m.canonical) for m in mappings])
            return [msgspec.structs.replace(f, seq=tx.enqueue(f.target, f.event_id, f.type, f.origin, f.created,
                                                              f.pending, f.body, f.occurred)) for f in followups]
        return await self._submit(run)

    async def natives(self, platform: PlatformName, grp: str, kind: str,
                      canonicals: Sequence[str]) -> dict[str, tuple[NativeId, int]]:
        def run(tx: SqliteTx) -> dict[str, tuple[NativeId, int]]:
            found = {}
            for c in canonicals:
                hit = tx.native_for(CanonicalId(c), platform, grp, kind)
                if hit:
                    found[c] = hit
            return found
        return await self._submit(run)

    async def dead_letter(self, item: OutboxItem, error: str, attempts: int, now: float) -> None:
        def run(tx: SqliteTx) -> None:
            tx.c.execute("DELETE FROM outbox WHERE seq = ?", (item.seq,))
            tx.c.execute("INSERT OR REPLACE INTO dead_letters (seq, platform, grp, event_id, type, origin, created,"
                         " pending, body, occurred, error, attempts, failed_at)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (item.seq, item.target.platform, item.target.group, item.event_id, item.type, item.origin,
                          item.created, item.pending, item.body, item.occurred, error[:2000], attempts, now))
        await self._submit(run)

    async def dead_letters(self, after_seq: int = 0, limit: int = 100) -> list[DeadLetter]:
        rows = await self._submit(lambda tx: tx.c.execute(
            f"SELECT {_OUTBOX_COLS}, error, attempts, failed_at FROM dead_letters WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit)).fetchall())
        return [DeadLetter(item=_item(r[:10]), error=r[10], attempts=r[11], failed_at=r[12]) for r in rows]

    async def dead_letter_count(self) -> int:
        return await self._submit(lambda tx: tx.c.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    async def replay(self, seqs: Sequence[int] | None) -> list[OutboxItem]:
        def run(tx: SqliteTx) -> list[OutboxItem]:
            if seqs is None:
                rows = tx.c.execute(f"SELECT {_OUTBOX_COLS} FROM dead_letters ORDER BY seq").fetchall()
            else:
                rows = []
                for s in seqs:
                    rows += tx.c.execute(f"SELECT {_OUTBOX_COLS} FROM dead_letters WHERE seq = ?", (s,)).fetchall()
            items = []
            for r in rows:
                old = _item(r)
                tx.c.execute("DELETE FROM dead_letters WHERE seq = ?", (old.seq,))
                seq = tx.enqueue(old.target, old.event_id, old.type, old.origin, old.created, old.pending, old.body,
                                 old.occurred)
                items.append(msgspec.structs.replace(old, seq=seq))
            return items
        return await self._submit(run)
