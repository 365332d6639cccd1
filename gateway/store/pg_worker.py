"""The PostgreSQL store's workers: one thread, one event loop, one connection
each, running batches of jobs in one transaction (``_Worker``), and the
migrations a worker applies when the store opens. See ``gateway.store.postgresql``."""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import asyncpg

from gateway.store.base import StoreUnavailable, refuse_newer_schema
from gateway.store.jobs import Job, settle
from gateway.store.pg_tx import PgTx, _retryable

if TYPE_CHECKING:
    from gateway.store.postgresql import PostgresStore

try:
    import uvloop
    _new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
    _new_loop = asyncio.new_event_loop

log = logging.getLogger("civic.store")

MAX_JOBS_PER_COMMIT = 60
"""Each job runs in its own savepoint, and PostgreSQL caches at most 64
subtransactions per transaction before every session on the server slows
down (subtransaction overflow); one job may carry a whole batch of events."""
CONNECT_TIMEOUT = 10.0
PROBE_INTERVAL = 0.5
"""Seconds between two connection attempts of an idle worker while the server is unreachable."""
RETRY_MIN, RETRY_MAX = 0.01, 2.0
MIGRATION_LOCK = int.from_bytes(b"civicmig", "big")


def migrations() -> list[tuple[int, str]]:
    """Numbered PostgreSQL migrations shipped with the package, in order (the
    same numbers as the SQLite dialect, ``gateway.store.sqlite.migrations``)."""
    return [(v, sql) for v, _name, sql in migration_files()]


def migration_files() -> list[tuple[int, str, str]]:
    """(number, file name, SQL) of each PostgreSQL migration, in order."""
    found = []
    for entry in resources.files("gateway.store").joinpath("migrations_pg").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


class _Retry(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _migrate(conn: asyncpg.Connection) -> None:
    """Apply pending migrations, one node at a time (a session advisory lock)."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations"
                           " (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)")
        done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        known = migrations()
        refuse_newer_schema(done, known)
        for version, sql in known:
            if version in done:
                continue
            log.info("applying store migration %04d (PostgreSQL)", version)
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, applied)"
                                   " VALUES ($1, extract(epoch FROM clock_timestamp()))", version)
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


class _Worker:
    """One thread, one event loop, one connection: runs batches of jobs."""

    def __init__(self, store: PostgresStore, index: int) -> None:
        self.store = store
        self.index = index
        self.finished = 0  # written by this worker's thread only
        self.commits = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conn: asyncpg.Connection | None = None
        self.thread: threading.Thread | None = None
        self._connect_error: str | None = None

    def start(self, ready: asyncio.Future[None]) -> None:
        self.thread = threading.Thread(target=self._main, args=(ready,), name=f"civic-pg-{self.index}", daemon=True)
        self.thread.start()

    def _main(self, ready: asyncio.Future[None]) -> None:
        self.loop = loop = _new_loop()
        try:
            self.conn = loop.run_until_complete(self.store._connect())
            if self.index == 0:
                loop.run_until_complete(_migrate(self.conn))
        except BaseException as exc:  # reported to open()
            self._disconnect()
            loop.close()
            self.store._to_loop(settle, [(ready, False, exc)])
            return
        self.store._to_loop(settle, [(ready, True, None)])
        jobs = self.store._jobs
        stop = False
        while not stop:
            if self.conn is None and self.store._down is not None:
                try:  # no server: look for it now and then, whether or not work comes
                    job = jobs.get(timeout=PROBE_INTERVAL)
                except queue.Empty:
                    self._reconnect(quiet=True)
                    continue
            else:
                job = jobs.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < MAX_JOBS_PER_COMMIT:
                try:
                    nxt = jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            results = self._run_batch(batch)
            self.finished += len(batch)
            self.store._to_loop(settle, results)
        self._disconnect()
        loop.close()

    def _run_batch(self, batch: list[Job]) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        delay = RETRY_MIN
        failures = 0
        while True:
            try:
                results = self._attempt(batch)
            except _Retry as retry:
                exc: BaseException = retry.cause
            except BaseException as other:
                if not _retryable(other) and self.conn is not None and not self.conn.is_closed():
                    # BEGIN or COMMIT itself failed, not one job: the batch fails as a whole.
                    log.error("store transaction failed: %s", other)
                    self._rollback()
                    return [(job.future, False, other) for job in batch]
                exc = other
            else:
                self.commits += 1
                return results
            failures += 1
            if self.store._closing and failures >= 3:
                log.error("store transaction of %d jobs failed while closing: %s", len(batch), exc)
                self._rollback()
                return [(job.future, False, exc) for job in batch]
            level = logging.INFO if isinstance(exc, asyncpg.exceptions.TransactionRollbackError) else logging.WARNING
            if self.store._down is not None:
                level = logging.DEBUG  # the outage was logged once
            log.log(level, "store transaction of %d jobs failed (%s: %s); retrying", len(batch),
                    type(exc).__name__, exc)
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RETRY_MAX)
            if not self._rollback() and not self._reconnect(quiet=self.store._down is not None):
                # The server is gone, not just this connection: fail now rather
                # than hold every caller until it returns (nothing was committed,
                # unless the connection broke during the commit itself).
                why = self._connect_error or f"{type(exc).__name__}: {exc}"
                self.store._set_down(why)
                if self.store.on_retry is not None:
                    self.store.on_retry()  # what the attempt cached is void
                unavailable = StoreUnavailable(f"PostgreSQL unreachable: {why}")
                return [(job.future, False, unavailable) for job in batch]
            if self.store.on_retry is not None:
                self.store.on_retry()

    def _attempt(self, batch: list[Job]) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        conn, loop = self.conn, self.loop
        if conn is None or loop is None:
            raise _Retry(ConnectionError("not connected to PostgreSQL"))
        run = loop.run_until_complete
        tx = PgTx(run, conn)
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        run(conn.execute("BEGIN; SAVEPOINT job"))
        for job in batch:
            try:
                value = job.fn(tx)
            except BaseException as exc:  # whatever it raised is its caller's, not the batch's
                if tx.broken is not None:
                    raise _Retry(tx.broken) from exc
                run(conn.execute("ROLLBACK TO SAVEPOINT job"))
                results.append((job.future, False, exc))
                continue
            if tx.broken is not None:  # the job caught a fatal error and went on
                raise _Retry(tx.broken)
            try:
                run(conn.execute("RELEASE SAVEPOINT job; SAVEPOINT job"))
            except asyncpg.PostgresError as exc:
                if _retryable(exc) or conn.is_closed():
                    raise
                # The job caught a statement error and returned: its work is void.
                run(conn.execute("ROLLBACK TO SAVEPOINT job"))
                results.append((job.future, False, exc))
                continue
            results.append((job.future, True, value))
        run(conn.execute("RELEASE SAVEPOINT job; COMMIT"))
        return results

    def _rollback(self) -> bool:
        """Roll back whatever is open; False if the connection is unusable."""
        conn, loop = self.conn, self.loop
        if conn is None or loop is None or conn.is_closed():
            return False
        try:
            if conn.is_in_transaction():
                loop.run_until_complete(conn.execute("ROLLBACK"))
            return True
        except Exception as exc:
            log.warning("rollback failed: %s", exc)
            return False

    def _reconnect(self, quiet: bool = False) -> bool:
        """A new connection; False (and ``_connect_error`` says why) when the
        server cannot be reached. ``quiet``: the outage is known, do not log."""
        self._disconnect()
        assert self.loop is not None
        try:
            self.conn = self.loop.run_until_complete(self.store._connect())
        except Exception as exc:  # the next attempt fails again and waits longer
            self._connect_error = f"{type(exc).__name__}: {exc}"
            (log.debug if quiet else log.warning)("reconnecting to PostgreSQL failed: %s", self._connect_error)
            self.conn = None
            return False
        self._connect_error = None
        self.store._set_reachable()
        return True

    def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None or conn.is_closed() or self.loop is None:
            if conn is not None:
                conn.terminate()
            return
        try:
            self.loop.run_until_complete(conn.close(timeout=2))
        except Exception:
            conn.terminate()
