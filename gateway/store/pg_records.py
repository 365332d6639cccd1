"""The PostgreSQL store's other records (``PgRecords``, a mixin of
``PostgresStore``): the moderation log and bans, consent, settings, adapter
state, pruning, and the cluster leases (on the database's clock, never a
node's). See ``gateway.store.postgresql``."""

from __future__ import annotations

import collections.abc
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from gateway.ids import CanonicalId, LinkName
from gateway.store.base import ClusterView, ModerationEntry, check_state_key, prefix_end
from gateway.store.pg_tx import PgJobs, PgTx, _rowcount

PRUNE_STEP = 2000
_STATE_SCAN_TO_END = "SELECT key, value FROM adapter_state WHERE platform = $1 AND key >= $2 ORDER BY key LIMIT $3"
_STATE_SCAN = ("SELECT key, value FROM adapter_state WHERE platform = $1 AND key >= $2 AND key < $4"
               " ORDER BY key LIMIT $3")


def _setting_lock(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"civic-setting\x00{key}".encode(), digest_size=8).digest(), "big",
                          signed=True)


class PgRecords(PgJobs):
    """Moderation log, bans, consent, settings, adapter state, pruning, cluster leases."""

    async def moderation_log(self, after_seq: int = 0, limit: int = 100,
                             link: str | None = None) -> list[ModerationEntry]:
        sql = ("SELECT time, link, platform, grp, action, subject, moderator, reason, category, event_id, seq,"
               " subject_identity, subject_name, moderator_identity FROM moderation_log WHERE seq > $1")
        args: list[Any] = [after_seq]
        if link is not None:
            sql += " AND link = $2"
            args.append(link)
        sql += f" ORDER BY seq LIMIT ${len(args) + 1}"
        args.append(limit)
        rows = await self._submit(lambda tx: tx.fetch(sql, *args))
        return [ModerationEntry(*r) for r in rows]

    async def bans(self) -> set[tuple[LinkName, CanonicalId]]:
        rows = await self._submit(lambda tx: tx.fetch("SELECT link, actor FROM bans"))
        return {(LinkName(a), CanonicalId(b)) for a, b in rows}

    async def withdrawn(self) -> set[CanonicalId]:
        rows = await self._submit(lambda tx: tx.fetch("SELECT actor FROM consent WHERE state = 'withdrawn'"))
        return {CanonicalId(r[0]) for r in rows}

    async def setting(self, key: str, default: Callable[[], str]) -> str:
        def run(tx: PgTx) -> str:
            # Nodes (and workers) creating the same setting at once take turns,
            # so ``default()`` runs once and everyone reads its value.
            tx.execute("SELECT pg_advisory_xact_lock($1)", _setting_lock(key))
            value = tx.fetchval("SELECT value FROM settings WHERE key = $1", key)
            if value is not None:
                return str(value)
            value = default()
            tx.execute("INSERT INTO settings (key, value) VALUES ($1, $2)", key, value)
            return value
        return await self._submit(run)

    async def state_get(self, platform: str, keys: Sequence[str]) -> dict[str, bytes]:
        wanted = list(dict.fromkeys(check_state_key(k) for k in keys))
        if not wanted:
            return {}
        rows = await self._submit(lambda tx: tx.fetch(
            "SELECT key, value FROM adapter_state WHERE platform = $1 AND key = ANY($2::text[])", platform, wanted))
        return {r[0]: bytes(r[1]) for r in rows}

    async def state_put(self, platform: str, items: collections.abc.Mapping[str, bytes | None], now: float) -> None:
        # Sorted: two nodes writing the same keys lock them in one order (no deadlock).
        sets = sorted((platform, check_state_key(k), bytes(v), now) for k, v in items.items() if v is not None)
        deletes = sorted(check_state_key(k) for k, v in items.items() if v is None)

        def run(tx: PgTx) -> None:
            if sets:
                tx.executemany("INSERT INTO adapter_state (platform, key, value, updated) VALUES ($1, $2, $3, $4)"
                               " ON CONFLICT (platform, key) DO UPDATE SET value = EXCLUDED.value,"
                               " updated = EXCLUDED.updated", sets)
            if deletes:
                tx.execute("DELETE FROM adapter_state WHERE platform = $1 AND key = ANY($2::text[])",
                           platform, deletes)
        if sets or deletes:
            await self._submit(run)

    async def state_scan(self, platform: str, prefix: str, limit: int = 1000) -> list[tuple[str, bytes]]:
        check_state_key(prefix)
        end = prefix_end(prefix)
        # A range of the primary key (the column's "C" collation: code point order).
        if end is None:
            sql, args = _STATE_SCAN_TO_END, (platform, prefix, limit)
        else:
            sql, args = _STATE_SCAN, (platform, prefix, limit, end)
        rows = await self._submit(lambda tx: tx.fetch(sql, *args))
        return [(r[0], bytes(r[1])) for r in rows]

    async def state_setdefault(self, platform: str, key: str, value: bytes, now: float) -> bytes:
        check_state_key(key)

        def run(tx: PgTx) -> bytes:
            tx.execute("INSERT INTO adapter_state (platform, key, value, updated) VALUES ($1, $2, $3, $4)"
                       " ON CONFLICT (platform, key) DO NOTHING", platform, key, bytes(value), now)
            return bytes(tx.fetchval("SELECT value FROM adapter_state WHERE platform = $1 AND key = $2",
                                     platform, key))
        return await self._submit(run)

    async def state_prune(self, platform: str, prefix: str, older_than: float) -> int:
        check_state_key(prefix)
        end = prefix_end(prefix)
        sql = "DELETE FROM adapter_state WHERE platform = $1 AND key >= $2 AND updated < $3"
        args: list[Any] = [platform, prefix, older_than]
        if end is not None:
            sql += " AND key < $4"
            args.append(end)
        return await self._submit(lambda tx: _rowcount(tx.execute(sql, *args)))

    async def prune_fingerprints(self, older_than: float) -> int:
        return await self._submit(lambda tx: _rowcount(tx.execute(
            "DELETE FROM sent_fingerprints WHERE sent < $1", older_than)))

    async def prune_processed(self, older_than: float) -> int:
        total = 0
        while True:  # small steps: no long transaction, no long wait for other jobs
            n = await self._submit(lambda tx: _rowcount(tx.execute(
                "DELETE FROM processed WHERE (platform, event_id) IN (SELECT platform, event_id FROM processed"
                " WHERE seen < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)", older_than, PRUNE_STEP)))
            total += n
            if n < PRUNE_STEP:
                return total

    # -- cluster leases --------------------------------------------------------------------------
    async def cluster_tick(self, node: str, partitions: int, ttl: float) -> ClusterView:
        def run(tx: PgTx) -> ClusterView:
            now = float(tx.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8"))
            until = now + ttl
            tx.execute("INSERT INTO cluster_nodes (node, seen) VALUES ($1, $2)"
                       " ON CONFLICT (node) DO UPDATE SET seen = EXCLUDED.seen", node, now)
            live = tuple(r[0] for r in tx.fetch("SELECT node FROM cluster_nodes WHERE seen > $1 ORDER BY node",
                                                now - ttl))
            if tx.fetchval("SELECT count(*) FROM cluster_leases WHERE part < $1", partitions) < partitions:
                tx.execute("INSERT INTO cluster_leases (part, owner, expires) SELECT g, NULL, 0"
                           " FROM generate_series(0, $1 - 1) AS g ON CONFLICT (part) DO NOTHING", partitions)
            share = -(-partitions // len(live))
            held = sorted(r[0] for r in tx.fetch(
                "UPDATE cluster_leases SET expires = $2 WHERE owner = $1 AND expires > $3 AND part < $4"
                " RETURNING part", node, until, now, partitions))
            kept, extra = held[:share], held[share:]
            # Above the fair share (a node joined): give the rest back for the newcomer.
            tx.execute("UPDATE cluster_leases SET owner = NULL, expires = 0"
                       " WHERE owner = $1 AND (part = ANY($2::int[]) OR part >= $3)", node, extra, partitions)
            claimed: list[int] = []
            if len(kept) < share:
                claimed = [r[0] for r in tx.fetch(
                    "UPDATE cluster_leases SET owner = $1, expires = $2 WHERE part IN (SELECT part FROM cluster_leases"
                    " WHERE part < $3 AND (owner IS NULL OR expires <= $4) ORDER BY part LIMIT $5"
                    " FOR UPDATE SKIP LOCKED) RETURNING part", node, until, partitions, now, share - len(kept))]
            return ClusterView(owned=frozenset(kept + claimed), nodes=live, epoch=now)
        return await self._submit(run)

    async def cluster_leave(self, node: str) -> None:
        def run(tx: PgTx) -> None:
            tx.execute("UPDATE cluster_leases SET owner = NULL, expires = 0 WHERE owner = $1", node)
            tx.execute("DELETE FROM cluster_nodes WHERE node = $1", node)
        await self._submit(run)

    async def cluster_owners(self) -> dict[int, str]:
        rows = await self._submit(lambda tx: tx.fetch(
            "SELECT part, owner FROM cluster_leases WHERE owner IS NOT NULL"
            " AND expires > extract(epoch FROM clock_timestamp()) ORDER BY part"))
        return {r[0]: r[1] for r in rows}
