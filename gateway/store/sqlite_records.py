"""The SQLite store's other records (``SqliteRecords``, a mixin of
``SqliteStore``): the moderation log and bans, consent, settings, adapter
state and pruning. See ``gateway.store.sqlite``."""

from __future__ import annotations

import collections.abc
from collections.abc import Callable, Sequence
from typing import Any

from gateway.ids import CanonicalId, LinkName
from gateway.store.base import ModerationEntry, check_state_key, prefix_end
from gateway.store.sqlite_tx import SqliteJobs, SqliteTx

STATE_GET_CHUNK = 500
"""Keys per ``IN (...)`` of ``state_get`` (old SQLite builds take at most 999 parameters)."""


class SqliteRecords(SqliteJobs):
    """Moderation log, bans, consent, settings, adapter state, pruning."""

    async def moderation_log(self, after_seq: int = 0, limit: int = 100,
                             link: str | None = None) -> list[ModerationEntry]:
        sql = ("SELECT time, link, platform, grp, action, subject, moderator, reason, category, event_id, seq,"
               " subject_identity, subject_name, moderator_identity FROM moderation_log WHERE seq > ?")
        args: list[Any] = [after_seq]
        if link is not None:
            sql += " AND link = ?"
            args.append(link)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        rows = await self._submit(lambda tx: tx.c.execute(sql, args).fetchall())
        return [ModerationEntry(*r) for r in rows]

    async def bans(self) -> set[tuple[LinkName, CanonicalId]]:
        rows = await self._submit(lambda tx: tx.c.execute("SELECT link, actor FROM bans").fetchall())
        return {(LinkName(a), CanonicalId(b)) for a, b in rows}

    async def withdrawn(self) -> set[CanonicalId]:
        rows = await self._submit(lambda tx: tx.c.execute(
            "SELECT actor FROM consent WHERE state = 'withdrawn'").fetchall())
        return {CanonicalId(r[0]) for r in rows}

    async def setting(self, key: str, default: Callable[[], str]) -> str:
        def run(tx: SqliteTx) -> str:
            row = tx.c.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            if row:
                return str(row[0])
            value = default()
            tx.c.execute("INSERT INTO settings (key, value) VALUES (?, ?)", (key, value))
            return value
        return await self._submit(run)

    async def state_get(self, platform: str, keys: Sequence[str]) -> dict[str, bytes]:
        wanted = list(dict.fromkeys(check_state_key(k) for k in keys))
        if not wanted:
            return {}

        def run(tx: SqliteTx) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for i in range(0, len(wanted), STATE_GET_CHUNK):
                chunk = wanted[i:i + STATE_GET_CHUNK]
                marks = ", ".join("?" * len(chunk))
                sql = f"SELECT key, value FROM adapter_state WHERE platform = ? AND key IN ({marks})"
                found.update((k, bytes(v)) for k, v in tx.c.execute(sql, (platform, *chunk)))
            return found
        return await self._submit(run)

    async def state_put(self, platform: str, items: collections.abc.Mapping[str, bytes | None], now: float) -> None:
        sets = [(platform, check_state_key(k), bytes(v), now) for k, v in items.items() if v is not None]
        deletes = [(platform, check_state_key(k)) for k, v in items.items() if v is None]

        def run(tx: SqliteTx) -> None:
            if sets:
                tx.c.executemany("INSERT INTO adapter_state (platform, key, value, updated) VALUES (?, ?, ?, ?)"
                                 " ON CONFLICT (platform, key) DO UPDATE SET value = excluded.value,"
                                 " updated = excluded.updated", sets)
            if deletes:
                tx.c.executemany("DELETE FROM adapter_state WHERE platform = ? AND key = ?", deletes)
        if sets or deletes:
            await self._submit(run)

    async def state_scan(self, platform: str, prefix: str, limit: int = 1000) -> list[tuple[str, bytes]]:
        check_state_key(prefix)
        end = prefix_end(prefix)
        # A range of the primary key (BINARY collation: code point order), not LIKE or substr.
        sql = "SELECT key, value FROM adapter_state WHERE platform = ? AND key >= ?"
        args: list[Any] = [platform, prefix]
        if end is not None:
            sql += " AND key < ?"
            args.append(end)
        sql += " ORDER BY key LIMIT ?"
        args.append(limit)
        rows = await self._submit(lambda tx: tx.c.execute(sql, args).fetchall())
        return [(k, bytes(v)) for k, v in rows]

    async def state_setdefault(self, platform: str, key: str, value: bytes, now: float) -> bytes:
        check_state_key(key)

        def run(tx: SqliteTx) -> bytes:
            tx.c.execute("INSERT OR IGNORE INTO adapter_state (platform, key, value, updated) VALUES (?, ?, ?, ?)",
                         (platform, key, bytes(value), now))
            row = tx.c.execute("SELECT value FROM adapter_state WHERE platform = ? AND key = ?",
                               (platform, key)).fetchone()
            return bytes(row[0])
        return await self._submit(run)

    async def state_prune(self, platform: str, prefix: str, older_than: float) -> int:
        check_state_key(prefix)
        end = prefix_end(prefix)
        sql = "DELETE FROM adapter_state WHERE platform = ? AND key >= ? AND updated < ?"
        args: list[Any] = [platform, prefix, older_than]
        if end is not None:
            sql += " AND key < ?"
            args.append(end)
        return int(await self._submit(lambda tx: tx.c.execute(sql, args).rowcount))

    async def prune_fingerprints(self, older_than: float) -> int:
        return await self._submit(lambda tx: tx.c.execute("DELETE FROM sent_fingerprints WHERE sent < ?",
                                                          (older_than,)).rowcount)

    async def prune_processed(self, older_than: float) -> int:
        # Rows arrive in time order, so the oldest have the lowest rowids: delete
        # in small steps from the start of the table (no index on ``seen`` to
        # maintain on every insert, and no long transaction on the loop).
        total = 0
        while True:
            n = await self._submit(lambda tx: tx.c.execute(
                "DELETE FROM processed WHERE rowid IN (SELECT rowid FROM processed WHERE seen < ?"
                " ORDER BY rowid LIMIT 2000)", (older_than,)).rowcount)
            total += n
            if n < 2000:
                return total

