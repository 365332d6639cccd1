"""The SQLite store's files: its migrations, the private mode of the database
files (``create_private``, ``warn_if_shared``) and the online ``backup``.
See ``gateway.store.sqlite``."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from importlib import resources



log = logging.getLogger("civic.store")


def migrations() -> list[tuple[int, str]]:
    """Numbered migrations shipped with the package, in order."""
    found = []
    for entry in resources.files("gateway.store").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


PRIVATE_MODE = 0o600
"""Mode of the files the store creates: they hold the ActivityPub private key
and people's ids, so no other user of the machine may read them."""


def create_private(path: str) -> None:
    """Called before SQLite first opens ``path``: create the file (if missing)
    with ``PRIVATE_MODE``. SQLite would create it 0644 (less the umask); it
    gives the ``-wal`` and ``-shm`` files it makes the mode of the main file,
    so those follow. A file that cannot be created is left to sqlite3.connect
    to report."""
    if path == ":memory:" or not path:
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_MODE))
    except OSError:
        pass


def warn_if_shared(path: str) -> list[str]:
    """Called at open: log a warning for each of the database's files (main,
    ``-wal``, ``-shm``) that other users may access (a file from before files
    were made private, or one copied with a loose mode); returns those files."""
    loose = []
    for f in (path, path + "-wal", path + "-shm"):
        try:
            mode = os.stat(f).st_mode & 0o777
        except OSError:
            continue
        if mode & 0o077:
            loose.append(f)
            log.warning("%s is readable by other users (mode %04o) and holds the gateway's private keys: "
                        "run `chmod 600 %s`", f, mode, f)
    return loose


def backup(path: str, dest: str, progress: Callable[[int, int], None] | None = None) -> None:
    """Copy the database at ``path`` to ``dest`` consistently while the gateway
    runs (SQLite's online backup: the copy is one committed state, WAL included).
    ``dest`` is created readable by its owner only, like the database."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no database at {path}")
    try:
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    except FileExistsError:
        raise FileExistsError(f"{dest} exists; choose a new file name") from None
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    out = sqlite3.connect(dest)
    try:
        src.execute("PRAGMA busy_timeout = 5000")
        src.backup(out, pages=1024, progress=(lambda _status, remaining, total: progress(total - remaining, total))
                   if progress else None)
    except BaseException:
        out.close()
        os.unlink(dest)  # a half copy must not pass for a backup
        raise
    finally:
        out.close()
        src.close()

