"""A real Synapse homeserver for tests, installed by the test set-up itself.

* ``ensure_synapse()`` (``ensure_synapse_shown(pytestconfig)`` in a fixture,
  so the progress lines get past pytest's capture): a virtualenv with ``matrix-synapse`` (pinned to
  ``SYNAPSE_VERSION``, from PyPI) in ``.cache/synapse-venv`` inside the
  repository (git-ignored). Created once, then reused; a file lock keeps
  parallel test processes from installing twice. The first install takes a
  minute or more and says so on stderr.
* ``Synapse``: one homeserver on a free port of 127.0.0.1 with SQLite in a
  directory of the test's own: a server name, open registration off but a
  ``registration_shared_secret``, rate limits off, the media store in the
  directory, no federation listener, and the appservice registration files it
  is given. ``start()`` waits until ``/_matrix/client/versions`` answers;
  ``stop()`` ends it by PID (SIGTERM, then SIGKILL). A context manager.
* Small synchronous client helpers (standard library only) for tests: register
  a user with the shared secret, log in, create a room, send and read messages.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.services import ServerProcess, ServiceUnavailable, free_port

SYNAPSE_VERSION = "1.163.2"
REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
VENV = CACHE / "synapse-venv"
CONSTRAINTS = Path(__file__).resolve().parent / "synapse-constraints.txt"
"""Synapse's own dependencies as tested (refresh: docs/contributing.md)."""
_MARKER = VENV / (f".installed-matrix-synapse-{SYNAPSE_VERSION}-"
                  f"{hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()[:12]}")


# -- installation -------------------------------------------------------------------------
def ensure_synapse() -> Path:
    """The Python interpreter of a venv holding matrix-synapse (installed on first use)."""
    python = VENV / "bin" / "python"
    if _MARKER.exists():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "synapse-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be installing: wait for it
        if _MARKER.exists():
            return python
        print(f"\n[synapse] installing matrix-synapse=={SYNAPSE_VERSION} into {VENV} "
              "(first run only; this takes a minute or more)", file=sys.stderr, flush=True)
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS),
                               f"matrix-synapse=={SYNAPSE_VERSION}"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceUnavailable(f"pip install matrix-synapse=={SYNAPSE_VERSION} failed:\n"
                                     f"{(done.stdout + done.stderr)[-3000:]}")
        _MARKER.write_text(f"{time.time()}\n")
        print(f"[synapse] installed in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return python


def ensure_synapse_shown(pytestconfig: Any) -> Path:
    """``ensure_synapse()`` with its progress lines on the terminal even while
    pytest captures output (call it from a fixture, before ``Synapse(...)``)."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capture is None:
        return ensure_synapse()
    with capture.global_and_fixture_disabled():
        return ensure_synapse()


# -- the homeserver -----------------------------------------------------------------------
def _relaxed() -> dict[str, float]:
    return {"per_second": 10000, "burst_count": 100000}


# Every rate limit Synapse 1.163 reads, relaxed: tests send in bursts.
_RATE_LIMITS: dict[str, Any] = {
    **{key: _relaxed() for key in ("rc_message", "rc_registration", "rc_room_creation", "rc_admin_redaction",
                                   "rc_joins_per_room", "rc_profile", "rc_media_create", "rc_reports",
                                   "rc_delayed_event_mgmt")},
    "rc_joins": {"local": _relaxed(), "remote": _relaxed()},
    "rc_invites": {"per_room": _relaxed(), "per_user": _relaxed(), "per_issuer": _relaxed()},
    "rc_login": {"address": _relaxed(), "account": _relaxed(), "failed_attempts": _relaxed()},
    "rc_presence": {"per_user": _relaxed()},
}


class MatrixError(RuntimeError):
    """A client-server API call answered with an error status."""

    def __init__(self, status: int, body: Any, what: str) -> None:
        self.status = status
        self.body = body
        self.errcode = body.get("errcode") if isinstance(body, dict) else None
        super().__init__(f"{what}: HTTP {status} {body}")


class Synapse(ServerProcess):
    """One Synapse on a free port of 127.0.0.1, SQLite, in ``workdir``.

    ``appservices``: registration files to load (``app_service_config_files``).
    Use as a context manager, or ``start()`` / ``stop()``."""

    name = "synapse"

    def __init__(self, workdir: Path, *, server_name: str = "civic.test",
                 appservices: Iterable[Path] = (), port: int | None = None) -> None:
        self.python = ensure_synapse()
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.server_name = server_name
        self.port = port or free_port()
        self.shared_secret = secrets.token_hex(24)
        self.log_path = self.log = self.dir / "synapse.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # A signing key is an ed25519 seed, written as Synapse's own
        # --generate-keys does: saves starting Synapse once just for that.
        key = self.dir / "signing.key"
        if not key.exists():
            seed = secrets.token_bytes(32)
            key.write_text(f"ed25519 a_test {base64.b64encode(seed).decode().rstrip('=')}\n")
        conf = {
            "server_name": server_name,
            "public_baseurl": f"{self.url}/",
            "pid_file": str(self.dir / "homeserver.pid"),
            "report_stats": False,
            "listeners": [{"port": self.port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
                           "x_forwarded": False, "resources": [{"names": ["client"], "compress": False}]}],
            "database": {"name": "sqlite3", "args": {"database": str(self.dir / "homeserver.db")}},
            "media_store_path": str(self.dir / "media_store"),
            "signing_key_path": str(key),
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_domain_whitelist": [],
            "url_preview_enabled": False,
            "enable_registration": False,
            "registration_shared_secret": self.shared_secret,
            "macaroon_secret_key": secrets.token_hex(24),
            "form_secret": secrets.token_hex(24),
            "app_service_config_files": [str(Path(p).resolve()) for p in appservices],
            "presence": {"enabled": False},
            **_RATE_LIMITS,
        }
        self.config = self.dir / "homeserver.yaml"
        self.config.write_text(json.dumps(conf, indent=1))  # JSON is YAML

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        return [str(self.python), "-m", "synapse.app.homeserver", "-c", str(self.config)], self.dir, None

    def _ready(self) -> bool:
        return self.request("GET", "/_matrix/client/versions", timeout=1).status == 200

    # -- client-server API ----------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                query: dict[str, str] | None = None, timeout: float = 30.0) -> "Response":
        """One HTTP call; any status comes back (``Response``), only network errors raise."""
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Response(status, parsed)

    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """Like ``request``, but the JSON body of a 2xx answer, else ``MatrixError``."""
        resp = self.request(method, path, body, **kw)
        if not 200 <= resp.status < 300:
            raise MatrixError(resp.status, resp.body, f"{method} {path}")
        return resp.body

    def register_user(self, localpart: str, password: str | None = None, *, admin: bool = False) -> "User":
        """A new user, through the shared-secret admin API (HMAC-SHA1 of nonce,
        user, password and admin flag, NUL-separated)."""
        password = password or secrets.token_urlsafe(12)
        nonce = self.call("GET", "/_synapse/admin/v1/register")["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(),
                                 b"admin" if admin else b"notadmin"]))
        done = self.call("POST", "/_synapse/admin/v1/register",
                         {"nonce": nonce, "username": localpart, "password": password, "admin": admin,
                          "mac": mac.hexdigest()})
        return User(done["user_id"], done["access_token"], password)

    def login(self, localpart: str, password: str) -> str:
        """A new access token for an existing user."""
        done = self.call("POST", "/_matrix/client/v3/login",
                         {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart},
                          "password": password})
        return str(done["access_token"])

    def create_room(self, token: str, *, room_version: str = "12", invite: Iterable[str] = (),
                    name: str | None = None) -> str:
        """A new private room (the creator's), its id."""
        body: dict[str, Any] = {"room_version": room_version, "preset": "private_chat", "invite": list(invite)}
        if name is not None:
            body["name"] = name
        return str(self.call("POST", "/_matrix/client/v3/createRoom", body, token=token)["room_id"])

    def join(self, token: str, room_id: str) -> None:
        self.call("POST", f"/_matrix/client/v3/join/{_q(room_id)}", {}, token=token)

    def send_text(self, token: str, room_id: str, text: str) -> str:
        """An ``m.text`` message; its event id."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/send/m.room.message/{secrets.token_hex(8)}"
        return str(self.call("PUT", path, {"msgtype": "m.text", "body": text}, token=token)["event_id"])

    def messages(self, token: str, room_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The room's latest ``m.room.message`` events, oldest first."""
        done = self.call("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/messages", token=token,
                         query={"dir": "b", "limit": str(limit)})
        return [e for e in reversed(done["chunk"]) if e.get("type") == "m.room.message"]


class Response:
    __slots__ = ("status", "body")

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body

    @property
    def errcode(self) -> str | None:
        return self.body.get("errcode") if isinstance(self.body, dict) else None

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body!r})"


class User:
    __slots__ = ("user_id", "token", "password")

    def __init__(self, user_id: str, token: str, password: str) -> None:
        self.user_id = user_id
        self.token = token
        self.password = password

    @property
    def localpart(self) -> str:
        return self.user_id[1:].split(":", 1)[0]


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")
