"""gateway/netguard.py: what the gateway refuses to connect to, and the limits
it keeps, against a local HTTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway.netguard import BadURL, FetchError, GuardedSession, address_allowed, ascii_host, parse_url
from tests.services import free_port


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("198.18.0.1", False), ("::1", False),
    ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ("2002:7f00:1::", False),
])
def test_private_addresses_need_permission(address: str, public: bool) -> None:
    assert address_allowed(address, allow_private=False) is public
    assert address_allowed(address, allow_private=True) is True


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "not-an-ip"])
def test_some_addresses_are_never_allowed(address: str) -> None:
    assert address_allowed(address, allow_private=True) is False


@pytest.fixture
async def server() -> AsyncIterator[str]:
    port = free_port()

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 100, content_type="text/plain")

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # no Content-Length: the limit must hold while streaming
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"y" * 1024)
        return resp

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def raw_hop(request: web.Request) -> web.Response:  # a Location aiohttp's own redirect would refuse
        return web.Response(status=302, headers={"Location": request.query["to"]})

    app = web.Application()
    app.router.add_get("/rawhop", raw_hop)
    app.router.add_get("/small", small)
    app.router.add_get("/big", big)
    app.router.add_get("/hop", hop)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def session(allow_private: bool) -> GuardedSession:
    s = GuardedSession(allow_private=allow_private, timeout=5)
    await s.start()
    return s


async def test_loopback_is_refused_by_address_and_by_name_unless_allowed(server: str) -> None:
    strict = await session(False)
    try:
        for url in (f"{server}/small", server.replace("127.0.0.1", "localhost") + "/small"):
            with pytest.raises(FetchError) as err:
                await strict.request("GET", url, max_bytes=1000)
            assert err.value.transient is False, url
    finally:
        await strict.close()
    lax = await session(True)
    try:
        got = await lax.request("GET", f"{server}/small", max_bytes=1000)
        assert got.status == 200 and got.body == b"x" * 100
    finally:
        await lax.close()


async def test_limits_hold_while_streaming_and_on_every_redirect(server: str) -> None:
    s = await session(True)
    try:
        with pytest.raises(FetchError) as err:
            await s.request("GET", f"{server}/big", max_bytes=10_000)
        assert err.value.status == 413
        got = await s.request("GET", f"{server}/hop?to=/small", max_bytes=1000)
        assert got.url == f"{server}/small" and got.body == b"x" * 100
        with pytest.raises(FetchError, match="0.0.0.0"):  # the second hop is checked too
            await s.request("GET", f"{server}/hop?to=http://0.0.0.0:1/x", max_bytes=1000)
        with pytest.raises(FetchError, match="redirects"):
            await s.request("GET", f"{server}/hop?to=/hop%3Fto%3D/hop%253Fto%253D/hop%25253Fto%25253D/small",
                            max_bytes=1000)
        with pytest.raises(FetchError, match="only http"):
            await s.request("GET", "file:///etc/passwd", max_bytes=1000)
        signed: list[str] = []
        await s.request("GET", f"{server}/hop?to=/small", max_bytes=1000,
                        sign=lambda m, u, h, b: signed.append(u) or {"X-Sig": "1"})
        assert signed == [f"{server}/hop?to=/small", f"{server}/small"]  # each hop signed anew
    finally:
        await s.close()


# -- malformed URLs: one typed error, before anything is resolved or connected ----------------------

MALFORMED = {
    "bracket without end": "http://[",
    "bad IPv6 literal": "http://[zz::1]/actor",
    "unclosed IPv6": "http://[::1/actor",
    "full-width number sign (NFKC)": "http://evil.example\uff03@good.example/actor",
    "300-character label": "http://" + "a" * 300 + ".example/actor",
    "254-character name": "http://" + ".".join(["a" * 50] * 5) + ".ex/actor",
    "empty label": "http://a..example/actor",
    "lone surrogate (raw byte)": "http://\udcffexample.org/actor",
    "NUL in host": "http://ex\x00ample.org/actor",
    "NUL in path": "http://example.org/act\x00or",
    "space in host": "http://exa mple.org/",
    "newline": "http://example.org/\r\nX-Injected: 1",
    "port out of range": "http://example.org:99999/actor",
    "port zero": "http://example.org:0/actor",
    "not numeric port": "http://example.org:http/actor",
    "user info": "http://user:pw@example.org/actor",
    "no host": "http:///actor",
    "other scheme": "ftp://example.org/actor",
    "file": "file:///etc/passwd",
    "not a URL": "keyid-without-scheme",
    "empty": "",
    "bad IDNA (joiner)": "http://a\u200db.example/actor",
    "bad IDNA (leading combining mark)": "http://\u0300a.example/actor",
    "disallowed code point": "http://ex\u2028ample.org/",
    "too long": "http://example.org/" + "a" * 9000,
}


@pytest.mark.parametrize("url", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_url_is_a_bad_url_error_not_a_value_error(url: str) -> None:
    s = await session(True)
    try:
        with pytest.raises(BadURL) as err:
            s.check_url(url)
        assert err.value.transient is False and isinstance(err.value, FetchError)
        with pytest.raises(BadURL):  # the request refuses it the same way, without connecting
            await s.request("GET", url, max_bytes=1000)
    finally:
        await s.close()


@pytest.mark.parametrize("url", ["http://münchen.example/actor", "https://EXAMPLE.org./a?b=c#d",
                                 "http://[2001:db8::1]:8080/x", "http://127.0.0.1:1/x", "http://a_b.example/"])
def test_well_formed_urls_pass(url: str) -> None:
    GuardedSession(allow_private=True).check_url(url)  # raises nothing


def test_ascii_host_encodes_idna_as_aiohttp_does() -> None:
    assert ascii_host("münchen.example") == "xn--mnchen-3ya.example"
    assert ascii_host("Example.ORG.") == "example.org."
    with pytest.raises(ValueError):
        ascii_host("a" * 64 + ".example")


async def test_a_redirect_to_a_malformed_url_is_a_bad_url(server: str) -> None:
    s = await session(True)
    try:
        with pytest.raises(BadURL):
            await s.request("GET", f"{server}/rawhop?to=http://%5B", max_bytes=1000)
    finally:
        await s.close()


@pytest.mark.parametrize("url", MALFORMED.values(), ids=MALFORMED.keys())
def test_parse_url_is_the_same_check_for_callers_that_only_read_urls(url: str) -> None:
    with pytest.raises(BadURL):
        parse_url(url)


def test_parse_url_takes_a_shorter_limit() -> None:
    assert parse_url("https://example.org/" + "a" * 100, max_length=200).hostname == "example.org"
    with pytest.raises(BadURL, match="longer than 50"):
        parse_url("https://example.org/" + "a" * 100, max_length=50)


@pytest.mark.parametrize("allow_private", [False, True])
async def test_loopback_written_as_another_number_is_refused_for_good_on_every_hop(server: str,
                                                                                    allow_private: bool) -> None:
    """``127.1``, ``2130706433``, ``0177.0.0.1``, ``0x7f.1`` are 127.0.0.1 to a
    resolver: refused, and never as a transient error (which would be retried
    for days); with private addresses allowed still refused, as no real server
    is written so. Invalid URLs are permanent too."""
    port = server.rsplit(":", 1)[1]
    s = await session(allow_private)
    try:
        for host in ("127.1", "2130706433", "0177.0.0.1", "0x7f.1", "0x7f000001", "127.0.1"):
            for url in (f"http://{host}:{port}/small", f"{server}/hop?to=http://{host}:{port}/small"):
                with pytest.raises(FetchError) as err:
                    await s.request("GET", url, max_bytes=1000)
                assert (err.value.transient, err.value.status) == (False, 0), url
                assert host in str(err.value)
        for url in ("http://[::1/x", f"http://127.0.0.1:{port}0000/x", "http://a..b/x", "http:///x"):
            with pytest.raises(FetchError) as err:
                await s.request("GET", url, max_bytes=1000)
            assert err.value.transient is False, url
    finally:
        await s.close()
