"""Hostile, unauthenticated requests to every public ActivityPub route (the
inboxes of a hosted group and of the instance actor, WebFinger, actors, notes,
activities, collections): each is refused with a 4xx and a reason, never a
500, and none disturbs the others: a genuine signed activity sent while they
arrive, and one sent after them, are both taken and reach the linked site.

The gateway runs in this process with a webhook site; a small actor of our
own (``Impostor``) signs the genuine activities. Bytes that no HTTP client
library would send (undecodable header bytes, NUL) go through a raw socket."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from adapters.activitypub import signatures as sig
from gateway.runtime import Gateway
from gateway.config import parse
from tests.services import free_port
from tests.sitekit import Site, new_secret, wait_for
from tests.test_ap_e2e import Impostor

PUBLIC = "https://www.w3.org/ns/activitystreams#Public"
LONG = "a" * 600


@dataclass
class Gw:
    gw: Gateway
    base: str
    port: int
    site: Site

    @property
    def group(self) -> str:
        return f"{self.base}/ap/groups/club"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    site = Site("site", new_secret(), prefix="s-")
    await site.start()
    text = (f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "{tmp_path}/gw.db"\nlog_format = "text"\n'
            f'retry_max_delay = 0.5\n[platforms.fedi]\nkind = "activitypub"\nbase_url = "{base}"\n'
            f'allow_private_addresses = true\ntimeout = 3\n' + site.config(batch_max=1)
            + '[[links]]\nname = "l"\n'
              'groups = [{platform = "fedi", group = "club"}, {platform = "site", group = "g"}]\n')
    gateway = Gateway(parse(text, "test.toml"))
    await gateway.start()
    await gateway.serve("127.0.0.1", port)
    try:
        yield Gw(gateway, base, port, site)
    finally:
        if gateway._runner is not None:
            await gateway._runner.cleanup()
        await gateway.stop()
        await site.stop()


def create(evil: Impostor, n: str, to: str, text: str = "hello") -> bytes:
    oid = evil.url.replace("/users/mallory", f"/notes/{n}")
    return orjson.dumps({"@context": "https://www.w3.org/ns/activitystreams", "id": oid + "#create", "type": "Create",
                         "actor": evil.url, "to": [PUBLIC, to],
                         "object": {"id": oid, "type": "Note", "attributedTo": evil.url, "content": text,
                                    "to": [PUBLIC, to]}})


def signature_header(key_id: str) -> str:
    return f'keyId="{key_id}",algorithm="rsa-sha256",headers="(request-target) host date digest",signature="AAAA"'


def key_ids(gw: Gw) -> dict[str, str]:
    """keyIds a Signature header may name that must be refused, not crash anything."""
    return {
        "open bracket": "http://[",
        "bad IPv6": "http://[zz::1]/k",
        "full-width number sign": "http://evil.example\uff03@127.0.0.1/k",
        "300-character label": "http://" + "a" * 300 + ".example/k",
        "port out of range": "http://127.0.0.1:99999/k",
        "no scheme": "main-key",
        "file": "file:///etc/passwd",
        "user info": f"http://u:p@127.0.0.1:{gw.port}/ap/actor#main-key",
        "bad IDNA": "http://\u0300a.example/k",
        "the gateway's own instance key": f"{gw.base}/ap/actor#main-key",
        "the gateway's own group key": f"{gw.group}#main-key",
        "600 characters": "http://example.org/" + LONG,
    }


def bad_activities(gw: Gw, evil: Impostor) -> dict[str, dict[str, Any]]:
    """Activities, signed by the impostor, that name things no server may name."""
    base = orjson.loads(create(evil, "h", gw.group))
    host = evil.url.rsplit("/users/", 1)[0]
    return {
        "id with NUL": {**base, "id": f"{host}/a\x00b"},
        "id open bracket": {**base, "id": "http://["},
        "id 300-character label": {**base, "id": "http://" + "a" * 300 + ".example/x"},
        "object id with NUL": {**base, "object": {**base["object"], "id": f"{host}/notes/\x00"}},
        "object id open bracket": {**base, "object": {**base["object"], "id": "http://[x"}},
        "actor open bracket": {**base, "actor": "http://["},
        "actor with NUL": {**base, "actor": evil.url + "\x00"},
        "Flag of bracket": {**base, "type": "Flag", "object": ["http://[", f"{gw.base}/ap/people/%00"]},
        "Move to bracket": {**base, "type": "Move", "object": evil.url, "target": "http://["},
        "Move to the gateway": {**base, "type": "Move", "object": evil.url, "target": f"{gw.base}/ap/actor"},
        "Undo of an id with NUL": {**base, "type": "Undo", "object": f"{host}/likes/\x00"},
        "mention with NUL": {**base, "object": {**base["object"], "tag": [{"type": "Mention", "href": "x\x00"}]}},
        "to 600 characters": {**base, "to": [PUBLIC, "http://example.org/" + LONG]},
        "inReplyTo not a URL": {**base, "object": {**base["object"], "inReplyTo": "javascript:alert(1)"}},
        "id a number": {**base, "id": 12345},
        "Follow of a 600 group": {**base, "type": "Follow", "object": f"{gw.base}/ap/groups/{LONG}"},
    }


def odd_but_harmless(gw: Gw, evil: Impostor) -> dict[str, dict[str, Any]]:
    """Well-formed activities about things of the gateway's that do not exist
    (an escaped NUL is a well-formed URL): taken (202) and ignored, as a
    Follow of a group that is gone is."""
    base = orjson.loads(create(evil, "h", gw.group))
    return {
        "Follow of a NUL group": {**base, "type": "Follow", "object": f"{gw.base}/ap/groups/%00"},
        "Follow of a 350 group": {**base, "type": "Follow", "object": f"{gw.base}/ap/groups/{'g' * 350}"},
        "Like of a NUL note": {**base, "type": "Like", "object": f"{gw.base}/ap/notes/%00"},
        "Undo of a NUL like": {**base, "type": "Undo", "object": f"{gw.base}/ap/activities/%00"},
        "Flag of a NUL person": {**base, "type": "Flag", "object": [f"{gw.base}/ap/people/%00"]},
    }


def get_paths(gw: Gw) -> dict[str, str]:
    host = f"127.0.0.1:{gw.port}"
    return {
        "webfinger NUL name": f"/.well-known/webfinger?resource=acct:%00@{host}",
        "webfinger NUL only": "/.well-known/webfinger?resource=acct:%00@x",
        "webfinger 600 characters": f"/.well-known/webfinger?resource=acct:{LONG}@{host}",
        "webfinger acct: + 600": "/.well-known/webfinger?resource=acct:" + LONG,
        "webfinger huge": "/.well-known/webfinger?resource=acct:" + "b" * 6000 + f"@{host}",
        "webfinger control character": f"/.well-known/webfinger?resource=acct:club%0A@{host}",
        "webfinger full-width": f"/.well-known/webfinger?resource=acct:club\uff03@{host}",
        "webfinger no resource": "/.well-known/webfinger",
        "webfinger empty": "/.well-known/webfinger?resource=",
        "webfinger two at": f"/.well-known/webfinger?resource=acct:club@x@{host}",
        "webfinger bad escape": f"/.well-known/webfinger?resource=acct:%ff%fe@{host}",
        "group NUL": "/ap/groups/%00",
        "group 600": f"/ap/groups/{LONG}",
        "group control": "/ap/groups/club%0A",
        "person NUL": "/ap/people/%00",
        "person 600": f"/ap/people/{LONG}",
        "person bad escape": "/ap/people/%ff",
        "note NUL": "/ap/notes/%00",
        "note 600": f"/ap/notes/{LONG}",
        "note unknown": "/ap/notes/nope",
        "activity NUL": "/ap/activities/%00",
        "activity 600": f"/ap/activities/{LONG}",
        "followers of NUL group": "/ap/groups/%00/followers",
        "outbox of 600 group": f"/ap/groups/{LONG}/outbox",
        "followers of unknown group": "/ap/groups/nope/followers",
        "outbox of NUL person": "/ap/people/%00/outbox",
        "following of unknown person": "/ap/people/nobody/following",
    }


async def raw(port: int, request: bytes) -> int:
    """Send ``request`` as it is; the status of the answer (0 if the server closed without one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return int(line.split()[1]) if line.startswith(b"HTTP/") else 0


def raw_post(gw: Gw, path: str, body: bytes, headers: list[bytes]) -> bytes:
    head = [f"POST {path} HTTP/1.1".encode(), f"Host: 127.0.0.1:{gw.port}".encode(),
            b"Content-Type: application/activity+json", f"Content-Length: {len(body)}".encode(),
            b"Connection: close", *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def inbox_jobs(gw: Gw, evil: Impostor, path: str, post: Any, raw_case: Any) -> list[Any]:
    """Every hostile POST to one inbox (``post``/``raw_case`` record each answer)."""
    jobs = []
    url = gw.base + path
    body = create(evil, "k", gw.group)
    ct = {"Content-Type": "application/activity+json"}
    for name, key_id in key_ids(gw).items():
        jobs.append(post(f"keyId {name}", path, body, {**ct, **evil.signed(url, body, key_id=key_id)}))
    for name, value in {"garbage": "garbage", "empty": "", "unclosed": 'keyId="', "no keyId": 'signature="AA"',
                        "huge": 'keyId="' + "x" * 20000 + '"', "bad base64": f'keyId="{evil.url}",signature="!!"',
                        "NUL escape": 'keyId="http://example.org/\\u0000"'}.items():
        jobs.append(post(f"Signature {name}", path, body, {**ct, "Signature": value}))
    jobs.append(post("Signature-Input without Signature", path, body,
                     {**ct, "Signature-Input": 'sig1=("@method");keyid="x"'}))
    jobs.append(post("Signature-Input garbage", path, body, {**ct, "Signature-Input": "(((", "Signature": ":::"}))
    for name, activity in bad_activities(gw, evil).items():
        b = orjson.dumps(activity)
        jobs.append(post(name, path, b, {**ct, **evil.signed(url, b)}))
    for name, activity in odd_but_harmless(gw, evil).items():
        b = orjson.dumps(activity)
        jobs.append(post(f"ignored {name}", path, b, {**ct, **evil.signed(url, b)}))
    # bytes no client library sends: undecodable and NUL bytes in headers
    for name, header in {"non-UTF-8 keyId": b'Signature: keyId="http://\xff\xfe.example/k",signature="AA"',
                         "non-UTF-8 keyId host": b'Signature: keyId="http://ex\xe9mple.org/k",signature="AA"',
                         "latin-1 Date": b"Date: Mon, 01 Jan 2024 00:00:00 \xff\xfe",
                         "NUL in keyId": b'Signature: keyId="http://example.org/\x00",signature="AA"'}.items():
        jobs.append(raw_case(f"raw {name}", raw_post(gw, path, body, [header])))
    signed = evil.signed(url, body)
    kept = [f"{k}: {v}".encode() for k, v in signed.items() if k.lower() not in ("signature", "content-type", "host")]
    mangled = b"Signature: " + signed["Signature"].encode().replace(b"algorithm", b"\xffalgorithm", 1)
    jobs.append(raw_case("raw signed, a non-UTF-8 byte in the signature", raw_post(gw, path, body, kept + [mangled])))
    return jobs


def get_jobs(gw: Gw, get: Any, raw_case: Any) -> list[Any]:
    jobs = [get(name, path) for name, path in get_paths(gw).items()]
    jobs.append(raw_case("raw GET NUL path", b"GET /ap/groups/\x00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    jobs.append(raw_case("raw GET non-UTF-8 webfinger", b"GET /.well-known/webfinger?resource=acct:\xff@x HTTP/1.1\r\n"
                                                          b"Host: x\r\nConnection: close\r\n\r\n"))
    return jobs


@pytest.mark.parametrize("target", ["/ap/groups/club/inbox", "/ap/actor/inbox", "/ap/inbox", "GET routes"])
async def test_hostile_requests_get_4xx_and_disturb_nothing(gw: Gw, target: str) -> None:
    """Each family of hostile requests, all at once, with a genuine activity
    among them; then another genuine one."""
    results: dict[str, int] = {}
    async with Impostor() as evil, aiohttp.ClientSession() as s:
        async def post(what: str, path: str, body: bytes, headers: dict[str, str]) -> None:
            async with s.post(gw.base + path, data=body, headers=headers) as r:
                results[what] = r.status

        async def get(what: str, path: str) -> None:
            async with s.get(gw.base + path, headers={"Accept": "application/activity+json"}) as r:
                results[what] = r.status

        async def raw_case(what: str, request: bytes) -> None:
            results[what] = await raw(gw.port, request)

        jobs = get_jobs(gw, get, raw_case) if target == "GET routes" else inbox_jobs(gw, evil, target, post, raw_case)
        inbox = gw.group + "/inbox"

        async def genuine(body: bytes) -> int:
            async with s.post(inbox, data=body, headers=evil.signed(inbox, body)) as r:
                return r.status

        statuses = await asyncio.gather(genuine(create(evil, "during", gw.group, "sent among the hostile ones")), *jobs)
        assert statuses[0] == 202
        assert await genuine(create(evil, "after", gw.group, "sent after the hostile ones")) == 202

    assert len(results) == len(jobs)
    bad = {k: v for k, v in results.items() if not (v == 202 if k.startswith("ignored ") else 400 <= v < 500)}
    assert not bad, f"not refused with a 4xx: {bad}"
    await wait_for(lambda: len(gw.site.of_type("civic.message.created")) >= 2, timeout=10, what="the genuine posts")
    texts = sorted(e["data"]["text"] for e in gw.site.of_type("civic.message.created"))
    assert texts == ["sent after the hostile ones", "sent among the hostile ones"]  # and nothing else
    metrics = gw.gw.metrics.render().decode()
    # the genuine two, the harmless ones, and the Moves into the gateway (well signed, refused by meaning)
    taken = 2 + sum(k.startswith("ignored ") or k == "Move to the gateway" for k in results)
    received = re.search(r'^civic_activitypub_received_total\{platform="fedi"\} ([0-9.]+)$', metrics, re.M)
    assert received is not None and float(received.group(1)) == taken, received
    if target != "GET routes":
        assert 'reason="bad_id"' in metrics and 'reason="own_key"' in metrics
