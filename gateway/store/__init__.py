"""Durable state behind one interface (``base.Store``); see ``open_store``.

What is where: ``base`` (``Tx``, ``Store``, ``StoreUnavailable``; re-exports
``records``: the stored records, state-key rules, schema guard), ``jobs`` (a
job and settling its future). SQLite: ``sqlite`` (``SqliteStore``: opening,
group commit, checkpoints), ``sqlite_tx``, ``sqlite_outbox`` (outbox and dead
letters), ``sqlite_records`` (moderation log, bans, settings, adapter state,
pruning), ``sqlite_files`` (migrations, file modes, backup). PostgreSQL:
``postgresql`` (``PostgresStore``: opening, job queue, outage), ``pg_tx``
(``PgTx``, packed outbox positions), ``pg_worker`` (worker threads,
migrations), ``pg_outbox``, ``pg_records`` (as for SQLite, plus cluster
leases). Each backend's module re-exports its public names.
"""

from __future__ import annotations

from gateway.store.base import Store


def open_store(database: str, *, synchronous: str = "normal") -> Store:
    """The store for a ``[gateway] database`` setting: a ``postgresql://`` (or
    ``postgres://``) URL selects PostgreSQL, which the nodes of a cluster share;
    a file path (or ``sqlite:///path``) selects SQLite. ``synchronous`` is
    SQLite's durability setting (PostgreSQL's is the server's own)."""
    if database.startswith(("postgresql://", "postgres://")):
        from gateway.store.postgresql import PostgresStore

        return PostgresStore(database)
    from gateway.store.sqlite import SqliteStore

    return SqliteStore(sqlite_path(database), synchronous=synchronous)


def sqlite_path(database: str) -> str:
    """The file of a SQLite ``[gateway] database`` setting (a path or ``sqlite:///path``)."""
    return database[len("sqlite:///"):] if database.startswith("sqlite:///") else database
