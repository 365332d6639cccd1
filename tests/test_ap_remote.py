"""adapters/activitypub/remote.py: what a fetched document must be (CVE-2024-23832,
CVE-2024-25623), and the inbox's size and depth limits, against a local server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from adapters.activitypub import signatures as sig
from adapters.activitypub.remote import Remote, RemoteError, too_deep
from gateway.netguard import GuardedSession
from tests.services import free_port

KEY = sig.generate_rsa_key()
SIGNATURES: list[str] = []


@pytest.fixture
async def server() -> AsyncIterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    signed = SIGNATURES

    def actor(path: str, **extra: object) -> dict[str, object]:
        return {"id": base + path, "type": "Person", "inbox": base + path + "/inbox",
                "publicKey": {"id": base + path + "#main-key", "owner": base + path,
                              "publicKeyPem": sig.public_key_pem(KEY)}, **extra}

    async def handle(request: web.Request) -> web.Response:
        signed.append(request.headers.get("Signature", ""))
        path = request.path
        ct = "application/activity+json"
        if path == "/users/plain":
            return web.Response(body=orjson.dumps(actor(path)), content_type="text/plain")
        if path == "/users/ld":
            return web.Response(body=orjson.dumps(actor(path)), headers={
                "Content-Type": 'application/ld+json; profile="https://www.w3.org/ns/activitystreams"'})
        if path == "/users/impostor":  # says it is someone else (CVE-2024-23832)
            return web.Response(body=orjson.dumps(actor("/users/victim")), content_type=ct)
        if path == "/users/redirect":
            raise web.HTTPFound(base + "/users/ok")
        if path == "/users/deep":
            return web.Response(body=b"[" * 100 + b"]" * 100, content_type=ct)
        if path == "/users/gone":
            return web.Response(status=410)
        return web.Response(body=orjson.dumps(actor(path)), content_type=ct)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield base
    await runner.cleanup()


async def remote() -> Remote:
    session = GuardedSession(allow_private=True, timeout=5)
    await session.start()
    signer_key = sig.generate_rsa_key()
    return Remote(session, lambda m, u, h, b: sig.sign_cavage(m, u, h, b, "https://gw.example/ap/actor#main-key",
                                                              signer_key, 1.8e9), max_body=100_000, max_depth=32)


async def test_documents_must_be_activitypub_and_be_what_was_asked_for(server: str) -> None:
    r = await remote()
    try:
        assert (await r.get(server + "/users/ok"))["id"] == server + "/users/ok"
        assert (await r.get(server + "/users/ld"))["type"] == "Person"
        # a redirect is fine when the document answering is what its own id says (it came from its origin)
        assert (await r.get(server + "/users/redirect"))["id"] == server + "/users/ok"
        for path, why in (("/users/plain", "not an ActivityPub document"), ("/users/impostor", "says it is"),
                          ("/users/deep", "nested deeper"),
                          ("/users/gone", "gone")):
            with pytest.raises(RemoteError, match=why):
                await r.get(server + path)
        owner, key = await r.key(server + "/users/ok#main-key")
        assert owner == server + "/users/ok" and sig.public_key_pem(key) == sig.public_key_pem(KEY)
        with pytest.raises(RemoteError):  # the impostor's key is not listed by the actor it names
            await r.key(server + "/users/impostor#main-key")
        # every fetch was signed by the gateway (servers in authorized-fetch mode need it)
        assert SIGNATURES and all('keyId="https://gw.example/ap/actor#main-key"' in s for s in SIGNATURES)
    finally:
        await r.session.close()


def test_depth_is_measured_without_recursion() -> None:
    deep: object = []
    for _ in range(100_000):
        deep = [deep]
    assert too_deep(deep, 32) and not too_deep({"a": [{"b": 1}]}, 32)
