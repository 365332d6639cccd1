"""The shared store: PostgreSQL through asyncpg, for one node or a cluster of them.

Worker threads. The ``Tx`` face is synchronous (the pipeline asks
``tx.first_seen(...)`` and uses the answer at once), so the store runs
``pool`` worker threads, each with its own event loop (uvloop when present)
and its own asyncpg connection, and the ``Tx`` methods call
``loop.run_until_complete`` on that loop, which is not running. Every call
(a ``transact`` and every async method) becomes a job on one shared queue; a
worker takes up to ``MAX_JOBS_PER_COMMIT`` jobs and runs them in ONE
transaction, each inside its own savepoint so that a failing job rolls back
alone (as ``SqliteStore`` does), commits, and settles the jobs' futures on the
caller's loop. A serialization failure, a deadlock or a lost connection makes
the worker roll back and run the whole batch again (reconnecting first if
needed): a job is never lost silently, but its function may run more than once.

An unreachable server. When the worker cannot reconnect, it fails the jobs of
its batch with ``StoreUnavailable`` instead of waiting for the server (a
caller answers at once: intake says 503 and Retry-After), marks the store
unavailable (``unavailable()`` says why, for ``/readyz``), and from then on
every call fails at once until a worker, trying to connect every
``PROBE_INTERVAL``, reaches the server again. Nothing committed is lost; what
failed was not done (or, cut during its commit, may have been: callers retry
only idempotent work).

The outbox horizon. Several nodes insert into the outbox at once and one node
at a time delivers a target group, paging with a cursor. A plain sequence is
not enough: a transaction can commit a lower ``seq`` after a higher one was
read, and the reader would never look back. So each row records the id of the
transaction that wrote it (``tx``, a ``xid8``), and ``outbox_page`` returns
only rows of transactions older than every transaction still running
(``pg_snapshot_xmin``), in ``(tx, seq)`` order: those rows are final, nothing
can later appear behind the cursor. ``OutboxItem.seq`` stays one increasing
int for the delivery engine: the PostgreSQL store hands out the packed
position ``(tx << 64) | seq`` and unpacks it in ``complete`` and
``dead_letter``. Dead letters keep the plain row ``seq`` (what the admin API
lists and replays).

Cluster leases. ``cluster_tick`` keeps ``cluster_nodes`` (who is alive) and
``cluster_leases`` (who owns each partition until when) on the database's
clock, never a node's.

Where it is: ``pg_tx`` (``PgTx``, packed positions), ``pg_worker`` (worker
threads, migrations), ``pg_outbox`` (outbox and dead letters), ``pg_records``
(moderation log, bans, settings, adapter state, pruning, cluster leases); this
module holds ``PostgresStore`` itself: opening, closing, the job queue and the
unreachable server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg

from gateway.store.base import Store, StoreUnavailable
from gateway.store.jobs import Job
from gateway.store.pg_outbox import HORIZON_WAIT, PgOutbox
from gateway.store.pg_records import PgRecords
from gateway.store.pg_tx import SEQ_BITS, SEQ_MASK, PgTx, pack_seq, unpack_seq
from gateway.store.pg_worker import (
    CONNECT_TIMEOUT,
    MAX_JOBS_PER_COMMIT,
    PROBE_INTERVAL,
    _Worker,
    migration_files,
    migrations,
)

__all__ = ["CONNECT_TIMEOUT", "HORIZON_WAIT", "MAX_JOBS_PER_COMMIT", "PROBE_INTERVAL", "SEQ_BITS", "SEQ_MASK",
           "PgTx", "PostgresStore", "migration_files", "migrations", "pack_seq", "unpack_seq"]

T = TypeVar("T")
log = logging.getLogger("civic.store")


class PostgresStore(PgOutbox, PgRecords, Store):
    """``Store`` over PostgreSQL (``postgresql://`` DSN); ``pool`` worker threads
    and connections run the jobs; ``horizon_wait``: see ``outbox_page``."""

    def __init__(self, dsn: str, *, pool: int = 2, horizon_wait: float = HORIZON_WAIT) -> None:
        if pool < 1:
            raise ValueError("pool: at least one connection")
        self.dsn = dsn
        self.pool = pool
        self.horizon_wait = horizon_wait
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._workers: list[_Worker] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._closing = False
        self._submitted = 0  # touched by the event loop thread only
        self._finished_before = 0  # jobs finished by workers of an earlier open()
        self._down: str | None = None  # why the server is unreachable (set and cleared by workers)
        self._down_since = 0.0
        self._down_lock = threading.Lock()

    @property
    def commits(self) -> int:
        """Transactions committed by the current workers."""
        return sum(w.commits for w in self._workers)

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        if self._workers:
            raise RuntimeError("store is already open")
        self._loop = loop = asyncio.get_running_loop()
        self._jobs = queue.SimpleQueue()
        self._closing = False
        self._down = None
        readies = []
        for i in range(self.pool):
            w = _Worker(self, i)
            ready: asyncio.Future[None] = loop.create_future()
            w.start(ready)
            self._workers.append(w)
            readies.append(ready)
        outcomes = await asyncio.gather(*readies, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            await self._stop_workers()
            raise failed[0]
        self._open = True

    async def close(self) -> None:
        if not self._workers:
            return
        self._open = False
        await self._stop_workers()

    async def _stop_workers(self) -> None:
        self._closing = True
        for _ in self._workers:
            self._jobs.put(None)  # after every job already queued
        workers, self._workers = self._workers, []

        def join() -> None:
            for w in workers:
                if w.thread is not None:
                    w.thread.join()
        await asyncio.get_running_loop().run_in_executor(None, join)
        self._finished_before += sum(w.finished for w in workers)

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT,
                                     server_settings={"application_name": "civic-gateway"})

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the caller's event loop (from a worker thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # that loop is closed: nobody waits for these any more
            pass

    # -- an unreachable server ---------------------------------------------------------------
    def unavailable(self) -> str | None:
        return self._down

    def _set_down(self, why: str) -> None:
        """A worker could not reach the server (from its thread)."""
        with self._down_lock:
            first = self._down is None
            if first:
                self._down_since = time.monotonic()
            self._down = why
        if first:
            log.error("PostgreSQL is unreachable (%s): store calls fail at once, intake answers 503, until it"
                      " answers again", why, extra={"error": why})

    def _set_reachable(self) -> None:
        """A worker reached the server again (from its thread)."""
        with self._down_lock:
            if self._down is None:
                return
            self._down = None
            lasted = time.monotonic() - self._down_since
        log.warning("PostgreSQL is reachable again after %.1f s", lasted,
                    extra={"outage_seconds": round(lasted, 1)})

    # -- the async face ----------------------------------------------------------------------
    def backlog(self) -> int:
        return self._submitted - self._finished_before - sum(w.finished for w in self._workers)

    def _submit(self, fn: Callable[[PgTx], T]) -> asyncio.Future[T]:
        loop = self._loop
        if loop is None or not self._open:
            raise RuntimeError("store is not open")
        if self._down is not None:
            raise StoreUnavailable(f"PostgreSQL unreachable: {self._down}")
        fut: asyncio.Future[T] = loop.create_future()
        self._submitted += 1
        self._jobs.put(Job(fn, fut))
        return fut

    async def transact(self, fn: Callable[[PgTx], T]) -> T:  # type: ignore[override]
        return await self._submit(fn)
