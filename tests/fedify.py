"""A real, independent ActivityPub peer for tests: the Fedify library (npm
``@fedify/fedify``), run with Node 22 from the npm ``node`` package (the
machine's Node may be older; Fedify needs 22), installed by the test set-up
itself.

* ``ensure_fedify()`` (``ensure_fedify_shown(pytestconfig)`` in a fixture, so
  the progress lines get past pytest's capture): ``tests/fedify_peer/``
  (``package.json``, ``package-lock.json``, ``peer.mjs``) copied into
  ``.cache/fedify-peer`` inside the repository (git-ignored) and
  ``npm install``-ed there once (about 10 s); a marker file names the pinned
  versions, so a change to them (or to the lock file) installs again. A file
  lock keeps parallel test processes from installing twice. ``peer.mjs`` is
  copied on every call (cheap), so edits to it need no reinstall.
* ``Fedify``: one peer on a free port of 127.0.0.1 (plain http; Fedify's SSRF
  guard is off with ``allowPrivateAddress``), everything in memory, fresh keys
  (RSA-2048 for HTTP Signatures, Ed25519 for Object Integrity Proofs) for each
  actor. ``start()`` waits until ``/_ctl/log`` answers; ``stop()`` ends it by
  PID (SIGTERM, then SIGKILL). A context manager. Its log is ``fedify.log`` in
  the work directory it is given.
* Actors all live at ``/users/{name}`` (Fedify serves every actor from one
  URI template): Persons (``persons=``, or any name a control call uses) and
  FEP-1b12 Groups (``groups=``, or ``create_actor(name, "Group")``). Every
  actor accepts Follows at once; a Group announces (``Announce`` with the
  activity embedded) each Create/Update/Delete/Like/EmojiReact/Undo/Dislike
  addressed to it (to/cc/audience) by one of its followers to all its
  followers. Inbound activities are handled inside the POST: once a delivery
  to the peer is answered 202, the activity is in ``log()``.
* Small synchronous helpers (standard library only) for the control API in
  ``peer.mjs`` (JSON in and out; see each method). Outgoing activities are
  signed by Fedify (RFC 9421 first, draft-cavage when refused, plus an
  Object Integrity Proof) and delivered immediately: a helper returns when
  every addressed inbox has answered, and raises ``FedifyError`` (HTTP 500
  from the control endpoint) if one refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tests.services import ServerProcess, ServiceUnavailable, free_port

FEDIFY_VERSION = "2.3.6"  # 2.3.8 does not install from the registry (pins a missing @fedify/vocab)
NODE_VERSION = "22.23.3"  # the npm `node` package: a Node 22 binary from the registry
REPO = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).resolve().parent / "fedify_peer"
CACHE = REPO / ".cache"
PEER_DIR = CACHE / "fedify-peer"
PUBLIC = "https://www.w3.org/ns/activitystreams#Public"


# -- installation -------------------------------------------------------------------------
def _marker() -> Path:
    """The install marker: names the versions and a digest of package.json + package-lock.json."""
    lock = SOURCE / "package-lock.json"
    digest = hashlib.sha256((SOURCE / "package.json").read_bytes()
                            + (lock.read_bytes() if lock.exists() else b"")).hexdigest()[:12]
    return PEER_DIR / f".installed-fedify-{FEDIFY_VERSION}-node-{NODE_VERSION}-{digest}"


def _node() -> Path:
    return PEER_DIR / "node_modules" / ".bin" / "node"


def ensure_fedify() -> Path:
    """The directory holding ``peer.mjs`` and its ``node_modules`` (installed on first use)."""
    marker = _marker()
    if not marker.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(CACHE / "fedify-peer.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be installing: wait for it
            if not marker.exists():
                _install(marker)
    shutil.copyfile(SOURCE / "peer.mjs", PEER_DIR / "peer.mjs")
    return PEER_DIR


def _install(marker: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise ServiceUnavailable("npm is not installed: the Fedify peer (npm @fedify/fedify, node@22) needs it")
    print(f"\n[fedify] installing @fedify/fedify@{FEDIFY_VERSION} and node@{NODE_VERSION} (npm) into "
          f"{PEER_DIR} (first run only; about 10 s)", file=sys.stderr, flush=True)
    started = time.monotonic()
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    for old in PEER_DIR.glob(".installed-*"):
        old.unlink()
    for name in ("package.json", "package-lock.json"):
        if (SOURCE / name).exists():
            shutil.copyfile(SOURCE / name, PEER_DIR / name)
    # `npm ci` when there is a lock file (exact tree), else `npm install`.
    verb = ["ci"] if (SOURCE / "package-lock.json").exists() else ["install"]
    done = subprocess.run([npm, *verb, "--no-audit", "--no-fund", "--loglevel=error"], cwd=PEER_DIR,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ServiceUnavailable(f"npm {verb[0]} in {PEER_DIR} (@fedify/fedify@{FEDIFY_VERSION}, node@{NODE_VERSION}) "
                                 f"failed (exit {done.returncode}); is registry.npmjs.org reachable?\n"
                                 f"{(done.stdout + done.stderr)[-3000:]}")
    probe = subprocess.run([str(_node()), "--version"], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.startswith("v22."):
        raise ServiceUnavailable(f"the npm node package did not give a Node 22 binary at {_node()}: "
                                 f"{probe.stdout}{probe.stderr}")
    marker.write_text(json.dumps({"fedify": FEDIFY_VERSION, "node": probe.stdout.strip(), "at": time.time()}) + "\n")
    print(f"[fedify] installed in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def ensure_fedify_shown(pytestconfig: Any) -> Path:
    """``ensure_fedify()`` with its progress lines on the terminal even while
    pytest captures output (call it from a fixture, before ``Fedify(...)``)."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capture is None:
        return ensure_fedify()
    with capture.global_and_fixture_disabled():
        return ensure_fedify()


# -- the peer -----------------------------------------------------------------------------
class FedifyError(RuntimeError):
    """A control call answered with an error status (its ``error`` text inside)."""

    def __init__(self, status: int, body: Any, what: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"{what}: HTTP {status} {body}")


class Fedify(ServerProcess):
    """One Fedify peer on a free port of 127.0.0.1; its log in ``workdir/fedify.log``.

    ``persons`` and ``groups``: actors made at start (more come into being when a
    control call names them, or through ``create_actor``). Use as a context
    manager, or ``start()`` / ``stop()``."""

    name = "the fedify peer"
    poll_every = 0.05

    def __init__(self, workdir: Path, *, persons: Iterable[str] = ("alice", "bob", "carol"),
                 groups: Iterable[str] = ("club",), port: int | None = None) -> None:
        self.home = ensure_fedify()
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persons = list(persons)
        self.groups = list(groups)
        self.log_path = self.dir / "fedify.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def actor_url(self, name: str) -> str:
        return f"{self.url}/users/{name}"

    def group_url(self, name: str) -> str:
        """Groups live under /users/ too: Fedify has one actor URI template."""
        return self.actor_url(name)

    def inbox_url(self, name: str | None = None) -> str:
        """An actor's inbox, or the shared inbox (``name=None``)."""
        return f"{self.url}/inbox" if name is None else f"{self.actor_url(name)}/inbox"

    def followers_url(self, name: str) -> str:
        return f"{self.actor_url(name)}/followers"

    def _command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        env = {**os.environ, "PORT": str(self.port), "PEER_PERSONS": ",".join(self.persons),
               "PEER_GROUPS": ",".join(self.groups), "NODE_NO_WARNINGS": "1"}
        return [str(_node()), "peer.mjs"], self.home, env

    def _ready(self) -> bool:
        return self.request("GET", "/_ctl/log", timeout=1)[0] == 200

    def start(self, timeout: float = 30.0) -> "Fedify":
        return super().start(timeout)  # type: ignore[no-any-return]

    # -- HTTP -----------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, Any]:
        """One HTTP call to the peer: (status, parsed JSON or text); only network errors raise.
        ``body``: bytes as they are, anything else as JSON."""
        q = {k: str(v) for k, v in (query or {}).items() if v is not None}
        url = self.url + path + (f"?{urllib.parse.urlencode(q)}" if q else "")
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, (json.loads(raw) if raw else None)
        except ValueError:
            return status, raw.decode(errors="replace")

    def ctl(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        """A control call: its JSON answer, or ``FedifyError``."""
        status, answer = self.request(method, f"/_ctl/{path}", body, query=query or None)
        if not 200 <= status < 300:
            raise FedifyError(status, answer, f"{method} /_ctl/{path}")
        return answer

    def get_ap(self, url_or_path: str) -> tuple[int, Any]:
        """An unsigned ActivityPub GET (``Accept: application/activity+json``) of the peer's own URLs."""
        path = url_or_path[len(self.url):] if url_or_path.startswith(self.url) else url_or_path
        return self.request("GET", path, headers={"Accept": "application/activity+json"})

    # -- control API (see tests/fedify_peer/peer.mjs) -------------------------------------
    def create_actor(self, name: str, kind: str = "Person", *, also_known_as: Iterable[str] | None = None) -> str:
        """Make a Person or Group now (no-op if it exists); its URL."""
        body: dict[str, Any] = {"name": name, "type": kind}
        if also_known_as is not None:
            body["also_known_as"] = list(also_known_as)
        return str(self.ctl("POST", "actor", body)["id"])

    def actors(self) -> list[dict[str, Any]]:
        """[{name, type, id}] of every actor on the peer."""
        return list(self.ctl("GET", "actors"))

    def follow(self, actor: str, target: str, **kw: Any) -> dict[str, Any]:
        """``actor`` (local name) sends Follow to ``target`` (an actor URL). {id, activity, delivered_to, followers}."""
        return dict(self.ctl("POST", "follow", {"actor": actor, "target": target, **kw}))

    def unfollow(self, actor: str, target: str, **kw: Any) -> dict[str, Any]:
        """Undo(Follow) of an earlier ``follow`` (the Follow embedded)."""
        return dict(self.ctl("POST", "unfollow", {"actor": actor, "target": target, **kw}))

    def note(self, actor: str, content: str, *, to: Iterable[str] = (), cc: Iterable[str] = (),
             summary: str | None = None, sensitive: bool | None = None, in_reply_to: str | None = None,
             audience: str | None = None, mentions: Iterable[str] = (),
             attachments: Iterable[dict[str, str]] = (), **kw: Any) -> dict[str, Any]:
        """Create(Note). ``to``/``cc``: URLs, ``"Public"``, or ``"followers"`` (the sender's);
        each actor URL among to/cc/audience/mentions gets it in its inbox (other URLs, e.g. a remote
        followers collection, are addressed but listed in ``skipped``). Extra fields: ``shared_inbox=True``
        delivers to shared inboxes, ``queue=True`` through Fedify's queue (with retries) instead of at once.
        Answer: {id (the Note), create (the Create's id), activity (JSON-LD sent), delivered_to (inbox
        URLs), followers (how many followers got it), skipped}."""
        body: dict[str, Any] = {"actor": actor, "content": content, "to": list(to), "cc": list(cc),
                                "mentions": list(mentions), "attachments": list(attachments), **kw}
        for key, value in (("summary", summary), ("sensitive", sensitive), ("inReplyTo", in_reply_to),
                           ("audience", audience)):
            if value is not None:
                body[key] = value
        return dict(self.ctl("POST", "note", body))

    def update(self, actor: str, id: str, content: str | None = None, *, summary: str | None = None,
               **kw: Any) -> dict[str, Any]:
        """Update(Note) of an earlier ``note`` (same addressing)."""
        body: dict[str, Any] = {"actor": actor, "id": id, **kw}
        if content is not None:
            body["content"] = content
        if summary is not None:
            body["summary"] = summary
        return dict(self.ctl("POST", "update", body))

    def delete(self, actor: str, id: str, **kw: Any) -> dict[str, Any]:
        """Delete(Tombstone) of an earlier ``note`` (same addressing); the note then 404s."""
        return dict(self.ctl("POST", "delete", {"actor": actor, "id": id, **kw}))

    def like(self, actor: str, object: str, to: Iterable[str] | None = None, **kw: Any) -> dict[str, Any]:
        """Like; to ``to`` (actor URLs), else to the object's author (looked up)."""
        body = {"actor": actor, "object": object, **kw}
        if to is not None:
            body["to"] = list(to)
        return dict(self.ctl("POST", "like", body))

    def undo_like(self, actor: str, object: str | None = None, *, id: str | None = None, **kw: Any) -> dict[str, Any]:
        """Undo(Like) (the Like embedded) of the latest Like of ``object``, or of the Like ``id``."""
        return dict(self.ctl("POST", "undo-like", {"actor": actor, "object": object, "id": id, **kw}))

    def react(self, actor: str, object: str, content: str, to: Iterable[str] | None = None,
              **kw: Any) -> dict[str, Any]:
        """EmojiReact with ``content`` (a Unicode emoji)."""
        body = {"actor": actor, "object": object, "content": content, **kw}
        if to is not None:
            body["to"] = list(to)
        return dict(self.ctl("POST", "react", body))

    def undo(self, actor: str, id: str, **kw: Any) -> dict[str, Any]:
        """Undo of any activity ``actor`` sent (Like, EmojiReact, Announce, ...), to the same recipients."""
        return dict(self.ctl("POST", "undo", {"actor": actor, "id": id, **kw}))

    def announce(self, actor: str, object: str, to: Iterable[str] | None = None, **kw: Any) -> dict[str, Any]:
        """A boost: Announce(object) to Public + ``to`` (else the object's author), cc the followers."""
        body = {"actor": actor, "object": object, **kw}
        if to is not None:
            body["to"] = list(to)
        return dict(self.ctl("POST", "announce", body))

    def flag(self, actor: str, objects: Iterable[str], content: str, to: Iterable[str], **kw: Any) -> dict[str, Any]:
        """Flag (a report) of ``objects`` (actor and/or note URLs) delivered to ``to``."""
        return dict(self.ctl("POST", "flag", {"actor": actor, "object": list(objects), "content": content,
                                              "to": list(to), **kw}))

    def move(self, actor: str, target: str, to: Iterable[str] = (), **kw: Any) -> dict[str, Any]:
        """Move(object=actor, target) to the actor's followers (and ``to``)."""
        return dict(self.ctl("POST", "move", {"actor": actor, "target": target, "to": list(to), **kw}))

    def also_known_as(self, actor: str, aliases: Iterable[str]) -> dict[str, Any]:
        """Set the actor's ``alsoKnownAs`` (for Move tests)."""
        return dict(self.ctl("POST", "also-known-as", {"actor": actor, "aliases": list(aliases)}))

    def send(self, actor: str, activity: dict[str, Any], to: Iterable[str] | None = None, **kw: Any) -> dict[str, Any]:
        """Any activity as JSON-LD (``id``/``actor``/``@context`` filled in), signed by ``actor``,
        delivered to ``to`` (else its own to/cc)."""
        body: dict[str, Any] = {"actor": actor, "activity": activity, **kw}
        if to is not None:
            body["to"] = list(to)
        return dict(self.ctl("POST", "send", body))

    def log(self, actor: str | None = None, *, type: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        """Received activities, oldest first, each {seq, received_at, inbox (name, None = shared),
        actors (local names concerned), type, id, sender, verified, signature {scheme, keyId},
        activity (the JSON as received), ...}; ``actor`` keeps those concerning that actor."""
        return list(self.ctl("GET", "log", actor=actor, type=type, since=since or None))

    def wait_for(self, actor: str | None, type: str | None = None, match: Callable[[dict[str, Any]], bool] | None = None,
                 *, timeout: float = 10.0, since: int = 0) -> dict[str, Any]:
        """The first log entry for ``actor`` of ``type`` that ``match`` accepts; waits for it."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.log(actor, type=type, since=since):
                if match is None or match(entry):
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no {type or 'activity'} for {actor} within {timeout:.0f} s; log:\n"
                                     f"{json.dumps(self.log(actor), indent=1)[-3000:]}\n{self.log_tail()}")
            time.sleep(0.05)

    def errors(self) -> list[dict[str, Any]]:
        """Delivery (outbox) and inbox-handler errors, oldest first: {at, error, activity}."""
        return list(self.ctl("GET", "errors"))

    def clear_log(self) -> None:
        self.ctl("POST", "clear-log", {})

    def lookup(self, url: str) -> dict[str, Any]:
        """What Fedify's ``lookupObject`` finds at ``url`` (JSON-LD), or ``FedifyError`` 404."""
        return dict(self.ctl("GET", "lookup", q=url))

    def followers(self, actor: str) -> list[str]:
        return list(self.ctl("GET", "followers", actor=actor)["followers"])

    def following(self, actor: str) -> list[dict[str, Any]]:
        """[{target, follow (the Follow's id), accepted}]."""
        return list(self.ctl("GET", "following", actor=actor)["following"])


def as_list(value: Any) -> list[Any]:
    """Fedify compacts one-element arrays to scalars: a list either way."""
    return [] if value is None else value if isinstance(value, list) else [value]
