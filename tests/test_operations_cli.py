"""The operator's commands (docs/operations.md) as an operator meets them:
``--version``, a database from a newer version, private database and backup
files, a busy port, and a relative ``database`` path. Commands run as a real
``civic-gateway`` process (``python -m gateway.cli``) where the exit code, the
one-line message and the absence of a traceback are what is tested."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import cli
from gateway.config import resolve_database
from gateway.store.sqlite import SqliteStore, migrations
from tests.services import free_port

ROOT = Path(__file__).resolve().parent.parent


def civic(*argv: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``civic-gateway ARGV`` to its end (each command here ends by itself)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gateway.cli", *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_database(path: Path, *, extra_migration: int | None = None) -> None:
    """A SQLite store at ``path`` as this version leaves it (plus a newer migration's number, if given)."""
    asyncio.run(fill_database(path))
    if extra_migration is not None:
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO schema_migrations (version, applied) VALUES (?, 0)", (extra_migration,))
        conn.close()


async def fill_database(path: Path) -> None:
    store = SqliteStore(str(path))
    await store.open()
    await store.setting("k", lambda: "v")
    await store.close()


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port of 127.0.0.1 that another socket listens on for the test's length."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


# -- 1. --version, and a database from a newer version ---------------------------------------

def test_version_is_the_installed_packages() -> None:
    r = civic("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"civic-gateway {importlib.metadata.version('civic-gateway')}"


def test_run_refuses_a_database_written_by_a_newer_version(tmp_path: Path) -> None:
    known = migrations()[-1][0]
    db = tmp_path / "state.db"
    make_database(db, extra_migration=known + 1)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\nlisten = "127.0.0.1:{free_port()}"\ndatabase = "{db}"\nlog_format = "text"\n')
    r = civic("run", "--config", str(cfg))
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines()[-1] == (
        f"civic-gateway: this database was written by a newer civic-gateway (schema {known + 1}, this version "
        f"knows up to {known}): upgrade civic-gateway or restore a backup")
    assert "Traceback" not in r.stderr
    with sqlite3.connect(db) as conn:  # left as it was
        assert max(v for (v,) in conn.execute("SELECT version FROM schema_migrations")) == known + 1
    conn.close()


# -- 2. the database and its backups are private ---------------------------------------------

@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_new_database_files_are_readable_by_their_owner_only(tmp_path: Path, synchronous: str) -> None:
    old = os.umask(0)  # not the umask's doing: even with none, nobody else may read them
    try:
        store = SqliteStore(str(tmp_path / "gw.db"), synchronous=synchronous)
        await store.open()
        try:
            await store.setting("k", lambda: "v")
            files = [tmp_path / name for name in ("gw.db", "gw.db-wal", "gw.db-shm")]
            assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
        finally:
            await store.close()
    finally:
        os.umask(old)


async def test_opening_a_database_others_can_read_warns_with_the_chmod_to_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "gw.db"
    await fill_database(path)
    path.chmod(0o644)
    store = SqliteStore(str(path))
    with caplog.at_level(logging.WARNING, logger="civic.store"):
        await store.open()
    await store.close()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"{path} is readable by other users (mode 0644)" in warned[0], warned
    assert f"chmod 600 {path}" in warned[0]
    assert mode(path) == 0o644  # told, not changed behind the operator's back

    caplog.clear()
    path.chmod(0o600)
    store = SqliteStore(str(path))
    with caplog.at_level(logging.WARNING, logger="civic.store"):
        await store.open()
    await store.close()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_backup_file_is_readable_by_its_owner_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_database(tmp_path / "gw.db")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\ndatabase = "{tmp_path / "gw.db"}"\n')
    dest = tmp_path / "copy.db"
    old = os.umask(0)
    try:
        assert cli.main(["backup", "--config", str(cfg), str(dest)]) == 0
    finally:
        os.umask(old)
    assert mode(dest) == 0o600
    with sqlite3.connect(dest) as conn:  # and it is a real copy
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(migrations())
    conn.close()


# -- 4. a busy port is one line, not a traceback -----------------------------------------------

def test_run_on_a_busy_port_names_the_port_and_the_setting(tmp_path: Path, held_port: int) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\nlisten = "127.0.0.1:{held_port}"\ndatabase = "gw.db"\nlog_format = "text"\n')
    r = civic("run", "--config", str(cfg))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"civic-gateway: port {held_port} on 127.0.0.1 is in use: "
                                f"change [gateway] listen in {cfg}")
    assert not (tmp_path / "gw.db").exists()  # found out before anything started


def test_run_losing_the_port_after_starting_says_the_same(tmp_path: Path, held_port: int,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The port taken between the early look and the real bind: the gateway stops again, same message."""
    async def free(_host: str, _port: int) -> bool:
        return False
    monkeypatch.setattr("gateway.web.server.port_taken", free)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\nlisten = "127.0.0.1:{held_port}"\ndatabase = "gw.db"\nlog_format = "text"\n')
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        assert cli.main(["run", "--config", str(cfg)]) == 1
    finally:
        asyncio.set_event_loop_policy(None)  # `run` installs uvloop's policy for the process
        root.handlers[:] = saved[0]  # `run` logs to this test's captured stderr, closed after it
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"civic-gateway: port {held_port} on 127.0.0.1 is in use: "
                                            f"change [gateway] listen in {cfg}")
    assert (tmp_path / "gw.db").exists()  # it did start this time


def _three_free_ports() -> int:
    """A port N with N, N+1 and N+2 free on 127.0.0.1 just now."""
    for _ in range(50):
        n = free_port()
        try:
            for p in (n + 1, n + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return n
    raise AssertionError("no three consecutive free ports")


@pytest.mark.parametrize("busy", [0, 1, 2])
def test_demo_on_a_busy_port_names_the_port_and_the_flag(tmp_path: Path, busy: int) -> None:
    port = _three_free_ports()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port + busy))
        s.listen()
        r = civic("demo", "--port", str(port), "--no-browser", "--data-dir", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"civic-gateway: port {port + busy} on 127.0.0.1 is in use: pass --port N to use "
                                f"other ports (the demo takes N, N+1 and N+2; now {port}..{port + 2})")


# -- 5. a relative database path is the config file's folder's --------------------------------

def test_resolve_database() -> None:
    assert resolve_database("state.db", "/etc/civic") == "/etc/civic/state.db"
    assert resolve_database("data/state.db", "/etc/civic") == "/etc/civic/data/state.db"
    assert resolve_database("sqlite:///state.db", "/etc/civic") == "sqlite:////etc/civic/state.db"
    assert resolve_database("/var/lib/civic/state.db", "/etc/civic") == "/var/lib/civic/state.db"
    assert resolve_database("sqlite:////var/lib/x.db", "/etc/civic") == "sqlite:////var/lib/x.db"
    assert resolve_database("postgresql://db.example/civic", "/etc/civic") == "postgresql://db.example/civic"


def test_check_config_from_another_folder_shows_the_database_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "conf" / "gw.toml").write_text('[gateway]\ndatabase = "state.db"\n')
    r = civic("check-config", "../conf/gw.toml", cwd=tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"../conf/gw.toml: ok (0 platforms, 0 links; database {tmp_path / 'conf' / 'state.db'})"


def test_run_and_backup_from_another_folder_use_the_database_beside_the_config(tmp_path: Path) -> None:
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf.mkdir()
    elsewhere.mkdir()
    port = free_port()
    (conf / "gw.toml").write_text(f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "state.db"\n'
                                  'log_format = "text"\n')
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", "../conf/gw.toml"],
                            cwd=elsewhere, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.1)
        assert (conf / "state.db").exists() and mode(conf / "state.db") == 0o600
        assert not (elsewhere / "state.db").exists()
        r = civic("backup", "--config", "../conf/gw.toml", "copy.db", cwd=elsewhere)
        assert r.returncode == 0, r.stderr
        assert f"{conf / 'state.db'} -> copy.db" in r.stderr
        assert (elsewhere / "copy.db").exists()  # the destination is the command line's, from where it runs
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    assert proc.returncode == 0, (tmp_path / "run.log").read_text()
