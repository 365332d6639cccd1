"""Durable state behind one interface (``base.Store``); see ``open_store``."""

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
