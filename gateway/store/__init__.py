"""Durable state behind one interface (``base.Store``); see ``open_store``."""

from __future__ import annotations

from gateway.store.base import Store


def open_store(database: str, *, synchronous: str = "normal") -> Store:
    """The store for a ``[gateway] database`` setting: a file path (or
    ``sqlite:///path``) selects SQLite."""
    if database.startswith(("postgresql://", "postgres://")):
        from gateway.errors import ConfigError

        raise ConfigError("gateway.database: PostgreSQL is not supported yet in this version; use a SQLite file path")
    from gateway.store.sqlite import SqliteStore

    return SqliteStore(sqlite_path(database), synchronous=synchronous)


def sqlite_path(database: str) -> str:
    """The file of a SQLite ``[gateway] database`` setting (a path or ``sqlite:///path``)."""
    return database[len("sqlite:///"):] if database.startswith("sqlite:///") else database
