"""A public endpoint withstands clients that send headers and then a body
slowly or never (issue 11), and every error of the site API is an RFC 9457
problem document.

Each test talks to a running gateway over real sockets on 127.0.0.1: raw
HTTP/1.1 written by hand where the point is *when* bytes are sent (headers
now, the body later or never), aiohttp otherwise. "Refused before the body
is read" is shown by the client sending only the headers and a few bytes of
a declared 1 MiB body and getting its answer anyway (a server waiting for
the body would answer 408 once ``body_timeout`` passed, never 401).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from adapters.activitypub import signatures as sig
from adapters.webhook import decode
from adapters.webhook.signing import sign
from gateway.runtime import Gateway
from gateway.config import parse
from gateway.errors import DecodeError
from schemas.cloudevents import BATCH_CONTENT_TYPE, CONTENT_TYPE
from tests.conftest import Net, start_net, stop_net
from tests.services import free_port
from tests.sitekit import Site, new_secret, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
MiB = 1024 * 1024
PROBLEM = "application/problem+json"


# -- raw HTTP over a socket ------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class RawClient:
    """One TCP connection on which the test decides when each byte goes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "RawClient":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send_head(self, method: str, path: str, headers: dict[str, str], port: int) -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "host"]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, within: float = 30.0) -> Answer:
        """The response (a guard against a hang, not a timing assertion)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), within)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = await asyncio.wait_for(self.reader.readexactly(int(headers.get("content-length", "0"))), within)
        return Answer(int(status_line.split()[1]), headers, body)

    async def closed_by_server(self, within: float = 60.0) -> bool:
        """True once the server closed the connection (EOF or reset)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), within):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def port_of(net: Net) -> int:
    return int(net.url.rsplit(":", 1)[1])


def webhook_headers(key: bytes, body: bytes, *, ts: int | None = None, signature: str | None = None,
                    length: int | None = None) -> dict[str, str]:
    wid = f"msg_{os.urandom(6).hex()}"
    ts = int(time.time()) if ts is None else ts
    return {"Content-Type": CONTENT_TYPE, "Content-Length": str(len(body) if length is None else length),
            "webhook-id": wid, "webhook-timestamp": str(ts),
            "webhook-signature": signature or sign(key, wid, ts, body)}


def plausible_signature() -> str:
    """A signature of the right shape that the headers alone cannot tell from a real one."""
    return "v1," + base64.b64encode(os.urandom(32)).decode()


def assert_problem(answer: Answer, status: int) -> dict[str, Any]:
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.headers["content-type"].startswith(PROBLEM), answer.headers
    doc = answer.json()
    assert doc["status"] == status and doc["type"] and doc["title"] and doc["detail"], doc
    return doc


@pytest.fixture
async def tight(tmp_path: Path) -> AsyncIterator[Net]:
    """Two linked sites; bodies get half a second, and 1 MiB at once (768 KiB for big ones)."""
    net = await start_net(tmp_path, ["a", "b"], extra_gateway="body_timeout = 0.5\nbody_budget = 1048576\n")
    try:
        yield net
    finally:
        await stop_net(net)


def message(sender: Any, text: str, **extra: Any) -> dict[str, Any]:
    return sender.event("civic.message.created", "g-a", {"id": f"m-{os.urandom(4).hex()}", "author": {"id": "u"},
                                                         "text": text, **extra})


# -- 1. headers first, then a bounded body ---------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unsigned", "stale", "future", "not-a-signature"])
async def test_bad_signature_headers_are_refused_before_the_body_is_read(tight: Net, case: str) -> None:
    port, key = port_of(tight), tight.senders["a"].key
    body = b"x" * MiB
    headers = {
        "unsigned": {"Content-Type": CONTENT_TYPE, "Content-Length": str(MiB)},
        "stale": webhook_headers(key, body, ts=int(time.time()) - 3600),
        "future": webhook_headers(key, body, ts=int(time.time()) + 3600),
        "not-a-signature": webhook_headers(key, body, signature="v1,not-base64!"),
    }[case]
    c = await RawClient.open(port)
    try:
        await c.send_head("POST", "/v1/platforms/a/events", headers, port)
        await c.send(body[:1000])  # then nothing more
        doc = assert_problem(await c.answer(), 401)
        assert doc["type"].endswith(":bad-signature") and doc["error"] == doc["detail"]
    finally:
        await c.close()
    assert tight.gw.read_body.in_flight == 0
    assert 'civic_bodies_refused_total{status="408"}' not in tight.gw.metrics.render().decode()


async def test_a_stalled_body_is_cut_off_by_the_deadline(tight: Net) -> None:
    port, key = port_of(tight), tight.senders["a"].key
    c = await RawClient.open(port)
    try:
        await c.send_head("POST", "/v1/platforms/a/events",
                          webhook_headers(key, b"", signature=plausible_signature(), length=200_000), port)
        await c.send(b"x" * 150_000)  # most of it, then a stall
        doc = assert_problem(await c.answer(), 408)
        assert doc["type"].endswith(":body-timeout")
        assert await c.closed_by_server()
    finally:
        await c.close()
    assert tight.gw.read_body.in_flight == 0  # what was read of it is let go
    assert 'civic_bodies_refused_total{status="408"} 1.0' in tight.gw.metrics.render().decode()


@pytest.fixture
async def budget(tmp_path: Path) -> AsyncIterator[Net]:
    """Two linked sites; 1 MiB of bodies at once (768 KiB for big ones), and time enough to hold them."""
    net = await start_net(tmp_path, ["a", "b"], extra_gateway="body_timeout = 60\nbody_budget = 1048576\n")
    try:
        yield net
    finally:
        await stop_net(net)


async def test_the_byte_budget_answers_503_with_retry_after_and_small_bodies_still_pass(budget: Net) -> None:
    port, key = port_of(budget), budget.senders["a"].key
    hog = await RawClient.open(port)
    try:
        # a big body that stalls after 700 KiB (big bodies may hold 768 KiB together)
        await hog.send_head("POST", "/v1/platforms/b/events",
                            webhook_headers(budget.senders["b"].key, b"", signature=plausible_signature(),
                                            length=760_000), port)
        await hog.send(b"x" * 700 * 1024)
        await wait_for(lambda: budget.gw.read_body.in_flight >= 700 * 1024, what="the gateway to hold 700 KiB")
        # a second big body does not fit: 503, come back later
        c = await RawClient.open(port)
        try:
            await c.send_head("POST", "/v1/platforms/a/events",
                              webhook_headers(key, b"", signature=plausible_signature(), length=300_000), port)
            await c.send(b"x" * 300_000)
            answer = await c.answer()
        finally:
            await c.close()
        doc = assert_problem(answer, 503)
        assert doc["type"].endswith(":busy") and int(answer.headers["retry-after"]) >= 1
        # a small, signed event still finds room
        status, doc = await budget.senders["a"].send([message(budget.senders["a"], "small and welcome")])
        assert status == 202, doc
    finally:
        await hog.close()
    await wait_for(lambda: budget.gw.read_body.in_flight == 0, what="the stalled body's bytes to be let go")
    await wait_for(lambda: [e["data"]["text"] for e in budget.sites["b"].of_type("civic.message.created")]
                   == ["small and welcome"], what="the small event at b")
    assert 'civic_bodies_refused_total{status="503"} 1.0' in budget.gw.metrics.render().decode()


# -- 3. problem documents ---------------------------------------------------------------------------------------
async def test_errors_of_the_site_api_are_problem_documents_naming_the_field(net3: Net) -> None:
    sa = net3.senders["a"]
    good = message(sa, "fine")
    missing_id = {k: v for k, v in good.items() if k != "id"}
    status, doc = await sa.send([missing_id])
    assert status == 400 and doc["field"] == "$.id" and doc["type"].endswith(":invalid-event"), doc
    wrong = dict(good, data=dict(good["data"], author={"id": 5}))
    status, doc = await sa.send([good, wrong], batch=True)
    assert status == 400 and doc["index"] == 1 and doc["field"] == "$.data.author.id", doc
    assert doc["status"] == 400 and doc["detail"] == doc["error"] and doc["title"]
    status, doc = await sa.send([good], body=b"{not json")
    assert status == 400 and doc["type"].endswith(":malformed-json")
    status, doc = await sa.send([good], body=b"{" + b' "p": "' + b"x" * (MiB + 10) + b'"}')
    assert status == 413 and doc["type"].endswith(":body-too-large") and doc["status"] == 413
    status, doc = await sa.send([good], content_type="text/plain")
    assert status == 415 and doc["status"] == 415

    async with aiohttp.ClientSession() as s:
        async def get(method: str, path: str, **kw: Any) -> tuple[int, str, dict[str, Any], Any]:
            async with s.request(method, net3.url + path, **kw) as r:
                return r.status, r.content_type, await r.json(content_type=None), r.headers

        status, ctype, doc, _ = await get("GET", "/no/such/route")
        assert (status, ctype) == (404, PROBLEM) and doc["status"] == 404 and "/no/such/route" in doc["detail"]
        status, ctype, doc, headers = await get("GET", "/v1/platforms/a/events")
        assert (status, ctype) == (405, PROBLEM) and doc["status"] == 405 and "POST" in headers["Allow"]
        status, ctype, doc, _ = await get("POST", "/v1/platforms/nosuch/events", data=b"{}")
        assert (status, ctype) == (404, PROBLEM) and "nosuch" in doc["error"]
        status, ctype, doc, _ = await get("GET", "/v1/moderation-log?after=x")
        assert (status, ctype) == (400, PROBLEM) and doc["type"].endswith(":bad-query")
        status, ctype, doc, headers = await get("GET", "/admin/v1/status")
        assert (status, ctype) == (401, PROBLEM) and headers["WWW-Authenticate"] == "Bearer"
        auth = {"Authorization": f"Bearer {net3.admin_token}"}
        status, ctype, doc, _ = await get("POST", "/admin/v1/dead-letters/replay", headers=auth,
                                          data=b'{"seqs": ["one"]}')
        assert (status, ctype) == (400, PROBLEM) and doc["field"] == "$.seqs[0]", doc


def _mutations(seed: int, n: int) -> list[tuple[bool, bytes]]:
    """Valid example events broken in one place each: a key removed, a value of
    the wrong type, an unknown key, an overlong string; alone or in a batch."""
    examples = [json.loads(p.read_text()) for p in sorted(EXAMPLES.glob("*.json"))]
    rnd = random.Random(seed)

    def paths(o: Any, p: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        out = [p] if p else []
        items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else []
        for k, v in items:
            out += paths(v, p + (k,))
        return out

    cases = []
    for _ in range(n):
        ev = json.loads(json.dumps(rnd.choice(examples)))
        where = rnd.choice(paths(ev))
        parent = ev
        for k in where[:-1]:
            parent = parent[k]
        op = rnd.choice(["delete", "retype", "unknown", "long"])
        if op == "delete" and isinstance(parent, dict):
            del parent[where[-1]]
        elif op == "unknown" and isinstance(parent, dict):
            parent["zz_unknown"] = 1
        elif op == "long":
            parent[where[-1]] = "x" * 100_000
        else:
            parent[where[-1]] = rnd.choice([1, None, [], {}, "s", True])
        batch = rnd.random() < 0.5
        cases.append((batch, json.dumps([rnd.choice(examples), ev] if batch else ev).encode()))
    return cases


def test_every_schema_400_names_the_field() -> None:
    refused = 0
    for batch, body in _mutations(11, 1500):
        try:
            decode.decode_body(BATCH_CONTENT_TYPE if batch else CONTENT_TYPE, body)
        except DecodeError as exc:
            refused += 1
            assert exc.status == 400 and exc.field and exc.field.startswith("$"), (str(exc), body[:200])
            assert (exc.index == 1) if batch else (exc.index == 0), (str(exc), exc.index)
    assert refused > 500  # the mutations do break events


# -- 2. ActivityPub: signed activities in pieces, and big ones ---------------------------------------------
class Actor:
    """A fediverse actor on a local server whose key the gateway can fetch."""

    def __init__(self) -> None:
        self.key = sig.generate_rsa_key()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/users/zoe"
        app = web.Application()

        async def actor(request: web.Request) -> web.Response:
            return web.Response(body=orjson.dumps({
                "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1"],
                "id": self.url, "type": "Person", "inbox": self.url + "/inbox", "preferredUsername": "zoe",
                "publicKey": {"id": self.url + "#main-key", "owner": self.url,
                              "publicKeyPem": sig.public_key_pem(self.key)}}), content_type="application/activity+json")

        async def inbox(request: web.Request) -> web.Response:
            return web.Response(status=202)
        app.router.add_get("/users/zoe", actor)
        app.router.add_post("/users/zoe/inbox", inbox)
        self.runner = web.AppRunner(app)

    async def __aenter__(self) -> "Actor":
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    def create(self, group: str, text: str, pad: int = 0) -> bytes:
        note = f"{self.url}/notes/{os.urandom(4).hex()}"
        to = ["https://www.w3.org/ns/activitystreams#Public", group]
        doc: dict[str, Any] = {"@context": "https://www.w3.org/ns/activitystreams", "id": note + "#create",
                               "type": "Create", "actor": self.url, "to": to,
                               "object": {"id": note, "type": "Note", "attributedTo": self.url, "content": text,
                                          "to": to}}
        if pad:
            doc["padding"] = "p" * pad  # a member the gateway does not know: ignored, but it makes the body big
        return orjson.dumps(doc)

    def headers(self, url: str, body: bytes, *, now: float | None = None, key_id: str | None = None
                ) -> dict[str, str]:
        h = {"Content-Type": "application/activity+json"}
        h.update(sig.sign_cavage("POST", url, h, body, key_id or self.url + "#main-key", self.key,
                                 time.time() if now is None else now))
        h["Content-Length"] = str(len(body))
        return h


@dataclass
class ApNet:
    gw: Gateway
    port: int
    site: Site

    @property
    def inbox(self) -> str:
        return f"http://127.0.0.1:{self.port}/ap/groups/club/inbox"


@pytest.fixture
async def apnet(tmp_path: Path) -> AsyncIterator[ApNet]:
    port = free_port()
    site = Site("site", new_secret(), prefix="s-")
    await site.start()
    text = (f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "{tmp_path}/gw.db"\nlog_format = "text"\n'
            f'body_timeout = 2\n[platforms.fedi]\nkind = "activitypub"\nbase_url = "http://127.0.0.1:{port}"\n'
            f'allow_private_addresses = true\ntimeout = 3\n' + site.config(batch_max=1)
            + '[[links]]\nname = "l"\ngroups = [{platform = "fedi", group = "club"}, {platform = "site", group = "g"}]\n')
    gw = Gateway(parse(text, "test.toml"))
    await gw.start()
    await gw.serve("127.0.0.1", port)
    try:
        yield ApNet(gw, port, site)
    finally:
        if gw._runner is not None:
            await gw._runner.cleanup()
        await gw.stop()
        await site.stop()


async def test_signed_activities_in_two_pieces_and_of_300_kib_are_accepted(apnet: ApNet) -> None:
    group = f"http://127.0.0.1:{apnet.port}/ap/groups/club"
    async with Actor() as zoe:
        # two TCP pieces with a pause between: headers and half the body, then the rest
        body = zoe.create(group, "in two pieces")
        c = await RawClient.open(apnet.port)
        try:
            await c.send_head("POST", "/ap/groups/club/inbox", zoe.headers(apnet.inbox, body), apnet.port)
            await c.send(body[: len(body) // 2])
            await asyncio.sleep(0.3)
            await c.send(body[len(body) // 2:])
            answer = await c.answer()
            assert answer.status == 202, answer.body
        finally:
            await c.close()
        # a 300 KiB activity, in pieces as the socket takes it
        big = zoe.create(group, "a big one", pad=300 * 1024)
        assert len(big) >= 300 * 1024
        c = await RawClient.open(apnet.port)
        try:
            await c.send_head("POST", "/ap/groups/club/inbox", zoe.headers(apnet.inbox, big), apnet.port)
            for i in range(0, len(big), 50_000):
                await c.send(big[i:i + 50_000])
                await asyncio.sleep(0.01)
            answer = await c.answer()
            assert answer.status == 202, answer.body
        finally:
            await c.close()
    await wait_for(lambda: sorted(e["data"]["text"] for e in apnet.site.of_type("civic.message.created"))
                   == ["a big one", "in two pieces"], what="both activities at the site")


@pytest.mark.parametrize("case", ["unsigned", "stale", "unknown-key"])
async def test_ap_inbox_refuses_bad_signature_headers_before_the_body(apnet: ApNet, case: str) -> None:
    group = f"http://127.0.0.1:{apnet.port}/ap/groups/club"
    async with Actor() as zoe:
        body = zoe.create(group, "never read", pad=MiB - 4096)
        headers = {
            "unsigned": {"Content-Type": "application/activity+json", "Content-Length": str(len(body))},
            "stale": zoe.headers(apnet.inbox, body, now=time.time() - 7200),
            "unknown-key": zoe.headers(apnet.inbox, body, key_id=zoe.url.replace("zoe", "nobody") + "#main-key"),
        }[case]
        c = await RawClient.open(apnet.port)
        try:
            await c.send_head("POST", "/ap/groups/club/inbox", headers, apnet.port)
            await c.send(body[:1000])  # then nothing more
            answer = await c.answer()
        finally:
            await c.close()
    assert answer.status == 401, answer.body
    assert answer.json()["reason"] == {"unsigned": "unsigned", "stale": "expired", "unknown-key": "no_key"}[case]
    assert apnet.gw.read_body.in_flight == 0


async def test_ap_inbox_cuts_a_stalled_signed_body(apnet: ApNet) -> None:
    group = f"http://127.0.0.1:{apnet.port}/ap/groups/club"
    async with Actor() as zoe:
        body = zoe.create(group, "stalls", pad=200_000)
        c = await RawClient.open(apnet.port)
        try:
            await c.send_head("POST", "/ap/groups/club/inbox", zoe.headers(apnet.inbox, body), apnet.port)
            await c.send(body[:150_000])
            answer = await c.answer()
        finally:
            await c.close()
    assert answer.status == 408 and answer.json()["reason"] == "body_timeout", answer.body
    assert apnet.gw.read_body.in_flight == 0
