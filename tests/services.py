"""Real services for tests: PostgreSQL and Mosquitto, started (or installed from
Debian's packages) when missing, never assumed.

* PostgreSQL: the machine's server on 127.0.0.1:5432 (trust auth) is used; if
  it is not running it is started with ``pg_ctlcluster``, and if it is not
  installed, ``apt-get install postgresql`` runs first. Each test gets a
  database of its own (``temp_database``), dropped afterwards.
* Mosquitto: every test that needs a broker starts its OWN ``mosquitto`` on a
  free port of 127.0.0.1 (so it can be stopped and restarted by PID without
  touching the machine's broker); the binary is installed with apt-get if it
  is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PG_HOST = os.environ.get("CIVIC_TEST_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("CIVIC_TEST_PGPORT", "5432"))
PG_USER = os.environ.get("CIVIC_TEST_PGUSER", "postgres")


class ServiceUnavailable(RuntimeError):
    pass


class ServerProcess:
    """A server the tests start as a child process and stop by its PID.

    A subclass sets ``name`` (for messages), ``log_path``, and implements
    ``_command()`` -> (argv, cwd, env or None) and ``_ready()`` (one quick
    probe: True once the server answers); ``start()``/``stop()`` and the
    context manager do the rest."""

    name = "server"
    log_path: Path
    proc: "subprocess.Popen[bytes] | None" = None
    poll_every = 0.1

    def _command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> Any:
        argv, cwd, env = self._command()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._ready():
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                self.proc = None
                raise ServiceUnavailable(f"{self.name} exited during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceUnavailable(f"{self.name} did not answer within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(self.poll_every)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _apt_install(*packages: str) -> None:
    if shutil.which("apt-get") is None:
        raise ServiceUnavailable(f"{' '.join(packages)} missing and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run([*sudo, "apt-get", "install", "-y", "-q", *packages], check=True, env=env,
                   stdout=subprocess.DEVNULL)


# -- PostgreSQL ---------------------------------------------------------------------------
def ensure_postgres() -> str:
    """A DSN of a running PostgreSQL server on 127.0.0.1 (started or installed if needed)."""
    if not _port_open(PG_HOST, PG_PORT):
        if shutil.which("pg_ctlcluster") is None:
            _apt_install("postgresql")
        versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
        if not versions:
            raise ServiceUnavailable("PostgreSQL is installed but has no cluster in /etc/postgresql")
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not _port_open(PG_HOST, PG_PORT):
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"PostgreSQL did not come up on {PG_HOST}:{PG_PORT}")
            time.sleep(0.2)
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}"


def _psql(sql: str, database: str = "postgres") -> None:
    subprocess.run(["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", database,
                    "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], check=True, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def temp_database() -> Iterator[str]:
    """A fresh, empty database for one test: yields its DSN, drops it afterwards."""
    base = ensure_postgres()
    name = "civic_test_" + uuid.uuid4().hex[:12]
    _psql(f"CREATE DATABASE {name}")
    try:
        yield f"{base}/{name}"
    finally:
        _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- Mosquitto ------------------------------------------------------------------------------
class Mosquitto:
    """A test's own Mosquitto on a free port of 127.0.0.1, stopped by its PID.

    ``acl`` / ``passwords`` (name -> password) switch on authentication; without
    them anonymous clients may do anything."""

    def __init__(self, workdir: Path, *, passwords: dict[str, str] | None = None, acl: str | None = None,
                 persistence: bool = True) -> None:
        if shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"):
            _apt_install("mosquitto")
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [f"listener {self.port} 127.0.0.1", f"persistence {'true' if persistence else 'false'}",
                 f"persistence_location {self.dir}/", "log_dest stderr", "log_type error", "log_type warning",
                 "max_queued_messages 100000", "max_inflight_messages 0", "autosave_interval 1"]
        if os.geteuid() == 0:
            # As root, mosquitto drops to the `mosquitto` user, which cannot write the
            # test's private directory: it would keep nothing across a restart.
            lines.append("user root")
        if passwords:
            pw = self.dir / "passwords"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in passwords.items()))
            pw.chmod(0o600)
            subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if acl is not None:
            (self.dir / "acl").write_text(acl)
            lines.append(f"acl_file {self.dir / 'acl'}")
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = self.dir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 15
        while not _port_open("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None:
                raise ServiceUnavailable(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise ServiceUnavailable("mosquitto did not listen within 15 s")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
