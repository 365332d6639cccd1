"""The Matrix appservice's inbound routes (adapters/matrix/inbound.py)
against a real Synapse.

One Synapse for the module, whose registration points at an aiohttp server
serving ``AppserviceInbound.routes()`` under ``/v1/platforms/hub`` (as
``appservice_url`` would in production). The server runs on its own event loop
in a thread, so the blocking Synapse helpers of the tests never stall it (the
homeserver may call us back while a test waits for its answer). ``ingest`` is a
recorder that can be told to raise ``Overloaded``."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from adapters.matrix.config import MatrixConfig
from adapters.matrix.homeserver import PingError, ping_homeserver
from adapters.matrix.inbound import AppserviceInbound
from adapters.matrix.registration import registration_yaml
from gateway.adapter import Inbound, IngestResult, Overloaded
from schemas.v1 import Message
from tests.services import free_port
from tests.synapse import Response, Synapse, ensure_synapse_shown

SERVER = "civic.test"
PREFIX = "/v1/platforms/hub"


class Recorder:
    """``ingest``: records every batch; raises ``Overloaded`` for the next ``overload`` calls."""

    def __init__(self) -> None:
        self.batches: list[list[Inbound]] = []
        self.overload = 0
        self.refused = 0
        self.lock = threading.Lock()

    async def __call__(self, events: Any) -> IngestResult:
        with self.lock:
            if self.overload > 0:
                self.overload -= 1
                self.refused += 1
                raise Overloaded(503, 1, "the store is busy; retry shortly")
            self.batches.append(list(events))
        return IngestResult(accepted=len(events), duplicates=0)

    @property
    def events(self) -> list[Inbound]:
        with self.lock:
            return [e for batch in self.batches for e in batch]


class RecordingInbound(AppserviceInbound):
    """Keeps the parsed body of every transaction it read (to replay one)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.bodies: dict[str, Any] = {}

    async def _read_json(self, request: web.Request) -> Any:
        body = await super()._read_json(request)
        if "txnId" in request.match_info:
            self.bodies[request.match_info["txnId"]] = body
        return body


class Gateway:
    """The aiohttp server in its thread, the inbound routes, and what reached them."""

    def __init__(self, config: MatrixConfig, port: int) -> None:
        self.config = config
        self.port = port
        self.recorder = Recorder()
        self.inbound = RecordingInbound(self.recorder, config, "hub")
        self.requests: list[tuple[str, str, int]] = []  # method, path, status
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        resp = await handler(request)
        self.requests.append((request.method, request.path, resp.status))
        return resp

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(middlewares=[self._record])
        app.add_routes(self.inbound.routes())
        self._runner = web.AppRunner(app)
        self.loop.run_until_complete(self._runner.setup())
        self.loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def run(self, coro: Any, timeout: float = 60) -> Any:
        """Run ``coro`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def transactions(self) -> list[tuple[str, int]]:
        """(txnId, status) of every transaction PUT so far."""
        mark = PREFIX + "/_matrix/app/v1/transactions/"
        return [(p[len(mark):], s) for m, p, s in list(self.requests) if m == "PUT" and p.startswith(mark)]


class Env:
    def __init__(self, synapse: Synapse, gateway: Gateway, config: MatrixConfig) -> None:
        self.synapse = synapse
        self.gateway = gateway
        self.config = config
        self.bot = f"@civic:{SERVER}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Env]:
    ensure_synapse_shown(pytestconfig)
    workdir = tmp_path_factory.mktemp("synapse-as")
    port = free_port()
    synapse_port = free_port()
    config = msgspec.convert({"homeserver": f"http://127.0.0.1:{synapse_port}", "server_name": SERVER,
                              "as_token": secrets.token_urlsafe(32), "hs_token": secrets.token_urlsafe(32),
                              "appservice_url": f"http://127.0.0.1:{port}{PREFIX}"}, MatrixConfig)
    reg = workdir / "civic-appservice.yaml"
    reg.write_text(registration_yaml(config, "hub"))
    gateway = Gateway(config, port)
    gateway.start()
    try:
        with Synapse(workdir / "hs", server_name=SERVER, appservices=[reg], port=synapse_port) as synapse:
            yield Env(synapse, gateway, config)
    finally:
        gateway.stop()


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def room_with_bot(env: Env) -> tuple[Any, str]:
    """A new person and a room of theirs that the appservice's bot has joined."""
    hs = env.synapse
    person = hs.register_user(f"p{secrets.token_hex(4)}")
    room = hs.create_room(person.token, invite=[env.bot])
    hs.join(env.config.as_token, room)  # the bot is the as_token's own user (sender_localpart)
    return person, room


def created(env: Env, event_id: str) -> list[Inbound]:
    return [e for e in env.gateway.recorder.events if e.event_id == event_id]


def call_gateway(env: Env, method: str, path: str, body: Any = None, token: str | None = None,
                 raw_auth: str | None = None) -> Response:
    """A request to our own routes, as a homeserver would make it."""
    async def go() -> Response:
        headers = {}
        if raw_auth is not None:
            headers["Authorization"] = raw_auth
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with aiohttp.ClientSession() as session:
            async with session.request(method, env.gateway.url + path, headers=headers,
                                       data=None if body is None else
                                       (body if isinstance(body, bytes) else json.dumps(body).encode())) as resp:
                text = await resp.read()
                return Response(resp.status, json.loads(text) if text else None)
    return env.gateway.run(go())


def q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


# -- messages from a real homeserver ------------------------------------------------------------------
def test_a_message_arrives_as_civic_message_created_with_matrix_ids(env: Env) -> None:
    person, room = room_with_bot(env)
    event_id = env.synapse.send_text(person.token, room, "hallo buren")
    [got] = wait_for(lambda: created(env, event_id), what="the message at ingest")
    assert (got.platform, got.group, got.type) == ("hub", room, "civic.message.created")
    assert isinstance(got.payload, Message)
    assert (got.payload.id, got.payload.author.id, got.payload.text) == (event_id, person.user_id, "hallo buren")
    assert got.time == pytest.approx(time.time(), abs=60)
    # The bot's own join came too, and was ignored (not carried): nothing else reached ingest from the room.
    assert [e.event_id for e in env.gateway.recorder.events if e.group == room] == [event_id]


def test_a_reply_arrives_with_reply_to(env: Env) -> None:
    person, room = room_with_bot(env)
    first = env.synapse.send_text(person.token, room, "wie komt er vrijdag?")
    content = {"msgtype": "m.text", "body": "> <@x:civic.test> wie komt er vrijdag?\n\nik!",
               "m.relates_to": {"m.in_reply_to": {"event_id": first}}}
    reply = env.synapse.call("PUT", f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message/r{secrets.token_hex(4)}",
                             content, token=person.token)["event_id"]
    [got] = wait_for(lambda: created(env, reply), what="the reply at ingest")
    assert got.type == "civic.message.created"
    assert (got.payload.reply_to, got.payload.text) == (first, "ik!")


def test_overloaded_makes_synapse_send_the_same_transaction_again(env: Env) -> None:
    person, room = room_with_bot(env)
    recorder = env.gateway.recorder
    before = len(env.gateway.transactions())
    with recorder.lock:
        recorder.overload, refused = 1, recorder.refused
    event_id = env.synapse.send_text(person.token, room, "eerst geweigerd")
    wait_for(lambda: recorder.refused > refused, what="the refused transaction")
    [got] = wait_for(lambda: created(env, event_id), timeout=30, what="the retried transaction")  # Synapse: 2 s backoff
    assert got.payload.text == "eerst geweigerd"
    txns = env.gateway.transactions()[before:]
    refused_txn = [t for t, status in txns if status == 503]
    assert len(refused_txn) == 1
    assert (refused_txn[0], 200) in txns  # the same transaction id, now stored
    time.sleep(0.5)
    assert len(created(env, event_id)) == 1


def test_a_replayed_transaction_changes_nothing(env: Env) -> None:
    person, room = room_with_bot(env)
    event_id = env.synapse.send_text(person.token, room, "één keer")
    wait_for(lambda: created(env, event_id), what="the message at ingest")
    txn = next(t for t, b in env.gateway.inbound.bodies.items()
               if any(e.get("event_id") == event_id for e in b["events"]))
    assert (txn, 200) in env.gateway.transactions()
    body = env.gateway.inbound.bodies[txn]
    batches = len(env.gateway.recorder.batches)
    replays = env.gateway.inbound.replays

    again = call_gateway(env, "PUT", f"/_matrix/app/v1/transactions/{txn}", body, token=env.config.hs_token)
    assert (again.status, again.body) == (200, {})
    assert len(env.gateway.recorder.batches) == batches and len(created(env, event_id)) == 1
    assert env.gateway.inbound.replays == replays + 1

    # After a restart the map of completed transactions is empty: the events go
    # to ingest again, with the same event ids, which the core's store dedupes.
    fresh = AppserviceInbound(env.gateway.recorder, env.config, "hub")
    redone = fresh.decode_events(body["events"], now=time.time())
    assert [e.event_id for e in redone if e.type == "civic.message.created"] == [event_id]
    assert [(e.event_id, e.group, e.type, e.payload) for e in redone if e.event_id == event_id] == \
        [(got.event_id, got.group, got.type, got.payload) for got in created(env, event_id)]


# -- authentication ----------------------------------------------------------------------------------
ROUTES = [("PUT", "/_matrix/app/v1/transactions/t-auth"), ("GET", f"/_matrix/app/v1/users/{q('@civic_x:civic.test')}"),
          ("GET", f"/_matrix/app/v1/rooms/{q('#civic_x:civic.test')}"), ("POST", "/_matrix/app/v1/ping")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_a_wrong_hs_token_is_forbidden_and_a_missing_one_unauthorized(env: Env, method: str, path: str) -> None:
    forged = f"$forged-{secrets.token_hex(4)}"
    body = {"events": [{"type": "m.room.message", "sender": "@mallory:civic.test", "room_id": "!r",
                        "event_id": forged, "origin_server_ts": 1, "content": {"msgtype": "m.text",
                                                                                   "body": "forged"}}]}
    pings = len(env.gateway.inbound.pings)
    for auth, status, errcode in [(f"Bearer {env.config.as_token}", 403, "M_FORBIDDEN"),
                                  (f"Bearer {env.config.hs_token}x", 403, "M_FORBIDDEN"),
                                  (None, 401, "M_UNAUTHORIZED"), ("Bearer ", 401, "M_UNAUTHORIZED"),
                                  (f"Basic {env.config.hs_token}", 401, "M_UNAUTHORIZED")]:
        resp = call_gateway(env, method, path, body, raw_auth=auth)
        assert (resp.status, resp.errcode) == (status, errcode), auth
    assert not [e for e in env.gateway.recorder.events if e.event_id == forged]
    assert len(env.gateway.inbound.pings) == pings
    # the right token gets past the check (and the forged event, as the homeserver's, is taken)
    ok = call_gateway(env, method, path, body, token=env.config.hs_token)
    assert ok.status == (404 if method == "GET" else 200)
    if method == "PUT":
        assert [e.event_id for e in env.gateway.recorder.events if e.event_id == forged] == [forged]


# -- transactions: bad events, bad bodies ------------------------------------------------------------------
def test_a_malformed_event_is_counted_and_the_others_are_stored(env: Env) -> None:
    good = {"type": "m.room.message", "sender": "@anna:civic.test", "room_id": "!room", "event_id": "$good",
            "origin_server_ts": 1_700_000_000_000, "content": {"msgtype": "m.text", "body": "goed"}}
    bad = {**good, "event_id": "$bad", "content": {"msgtype": "m.text", "body": 42}}
    echo = {**good, "event_id": "$echo", "sender": "@civic_mastodon_x:civic.test"}
    errors, ignored = env.gateway.inbound.decode_errors, env.gateway.inbound.ignored.get("echo", 0)
    resp = call_gateway(env, "PUT", "/_matrix/app/v1/transactions/t-mixed", {"events": [bad, echo, good]},
                        token=env.config.hs_token)
    assert (resp.status, resp.body) == (200, {})
    stored = [e for e in env.gateway.recorder.events if e.event_id in ("$good", "$bad", "$echo")]
    assert [(e.event_id, e.time) for e in stored] == [("$good", 1_700_000_000.0)]
    assert env.gateway.inbound.decode_errors == errors + 1
    assert env.gateway.inbound.ignored["echo"] == ignored + 1


def test_a_body_that_is_not_a_transaction_is_refused(env: Env) -> None:
    batches = len(env.gateway.recorder.batches)
    not_json = call_gateway(env, "PUT", "/_matrix/app/v1/transactions/t-bad1", b"{", token=env.config.hs_token)
    assert (not_json.status, not_json.errcode) == (400, "M_NOT_JSON")
    no_events = call_gateway(env, "PUT", "/_matrix/app/v1/transactions/t-bad2", {"events": {}},
                             token=env.config.hs_token)
    assert (no_events.status, no_events.errcode) == (400, "M_BAD_JSON")
    assert len(env.gateway.recorder.batches) == batches
    # a refused transaction is not marked completed: sent again correctly, it is taken
    fixed = call_gateway(env, "PUT", "/_matrix/app/v1/transactions/t-bad2", {"events": []},
                         token=env.config.hs_token)
    assert (fixed.status, fixed.body) == (200, {})


# -- queries, as Synapse makes them ------------------------------------------------------------------
def test_synapse_asks_about_an_alias_in_our_namespace_and_gets_not_found(env: Env) -> None:
    hs = env.synapse
    person = hs.register_user(f"q{secrets.token_hex(4)}")
    alias = f"#civic_forum_{secrets.token_hex(3)}:{SERVER}"
    resp = hs.request("GET", f"/_matrix/client/v3/directory/room/{q(alias)}", token=person.token)
    assert (resp.status, resp.errcode) == (404, "M_NOT_FOUND")
    asked = [(m, p, s) for m, p, s in env.gateway.requests if p.endswith("/rooms/" + alias)]
    assert asked == [("GET", f"{PREFIX}/_matrix/app/v1/rooms/{alias}", 404)]
    outside = hs.request("GET", f"/_matrix/client/v3/directory/room/{q('#forum:' + SERVER)}", token=person.token)
    assert outside.status == 404  # not ours: Synapse does not ask
    assert not [p for _, p, _ in env.gateway.requests if p.endswith("/rooms/#forum:" + SERVER)]


def test_user_queries_are_answered_not_found(env: Env) -> None:
    resp = call_gateway(env, "GET", f"/_matrix/app/v1/users/{q('@civic_mastodon_anna:civic.test')}",
                        token=env.config.hs_token)
    assert (resp.status, resp.errcode) == (404, "M_NOT_FOUND")


# -- ping --------------------------------------------------------------------------------------------
def test_ping_homeserver_round_trip_reaches_our_route(env: Env) -> None:
    async def ping(config: MatrixConfig, txn: str | None = None) -> float:
        async with aiohttp.ClientSession() as session:
            return await ping_homeserver(session, config, transaction_id=txn)

    txn = f"ping-{secrets.token_hex(4)}"
    took = env.gateway.run(ping(env.config, txn))
    assert 0 <= took < 30
    assert env.gateway.inbound.pings[-1] == txn

    with pytest.raises(PingError) as info:  # a wrong as_token: the homeserver does not know us
        env.gateway.run(ping(msgspec.structs.replace(env.config, as_token=secrets.token_urlsafe(32))))
    assert info.value.status == 401 and info.value.errcode == "M_UNKNOWN_TOKEN"
    with pytest.raises(PingError) as info:  # another appservice's id
        env.gateway.run(ping(msgspec.structs.replace(env.config, id="someone-else")))
    assert info.value.status == 403 and info.value.errcode == "M_FORBIDDEN"


def test_ping_homeserver_says_when_our_route_refuses(env: Env) -> None:
    """The homeserver reached us but our route refused its hs_token: M_BAD_STATUS, with our status."""
    routes_token = env.gateway.inbound._hs_token
    env.gateway.inbound._hs_token = b"not-the-token-the-homeserver-has-xx"
    try:
        async def ping() -> float:
            async with aiohttp.ClientSession() as session:
                return await ping_homeserver(session, env.config)
        with pytest.raises(PingError, match="HTTP 403") as info:
            env.gateway.run(ping())
        assert (info.value.status, info.value.errcode) == (502, "M_BAD_STATUS")
    finally:
        env.gateway.inbound._hs_token = routes_token


def test_ping_homeserver_says_when_the_homeserver_is_unreachable(env: Env) -> None:
    async def ping() -> float:
        async with aiohttp.ClientSession() as session:
            return await ping_homeserver(session, msgspec.structs.replace(
                env.config, homeserver=f"http://127.0.0.1:{free_port()}"), timeout=5)
    with pytest.raises(PingError, match="unreachable") as info:
        env.gateway.run(ping())
    assert info.value.status == 0
