"""The gateway SIGKILLed while a real Synapse is pushing it a transaction, and
restarted: nothing a Matrix user posted is lost, and the site gets it in order.

The homeserver reaches the gateway through a small HTTP proxy of the test's
own, which sees when a transaction has been handed to the gateway and not yet
answered: that is when the test kills the gateway process (``civic-gateway
run``), so each kill lands mid-transaction, not merely between two. Synapse
keeps what was not acknowledged and sends it again; the restarted gateway pings
the homeserver, which makes it retry at once."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp import web

from adapters.matrix.config import MatrixConfig
from adapters.matrix.registration import registration_yaml
from tests.clusterkit import Node
from tests.services import free_port
from tests.sitekit import Site, new_secret, wait_for
from tests.synapse import Synapse, _q, ensure_synapse_shown

SERVER = "civic.test"
SCALE = float(os.environ.get("CIVIC_SOAK_SCALE", "1"))
MESSAGES = int(240 * SCALE)
KILLS = 3


class Proxy:
    """Homeserver -> proxy -> gateway; ``in_flight`` is set while a
    transaction is with the gateway and unanswered."""

    def __init__(self, port: int, upstream: str) -> None:
        self.port, self.upstream = port, upstream
        self.in_flight = asyncio.Event()
        self.cut = 0  # transactions whose gateway died before answering
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
        if self.session:
            await self.session.close()

    async def forward(self, request: web.Request) -> web.Response:
        assert self.session is not None
        body = await request.read()
        txn = request.method == "PUT" and "/transactions/" in request.path
        if txn:
            self.in_flight.set()
        try:
            async with self.session.request(request.method, self.upstream + request.path_qs, data=body,
                                            headers={k: v for k, v in request.headers.items()
                                                     if k.lower() in ("authorization", "content-type")}) as resp:
                answer = await resp.read()
                return web.Response(status=resp.status, body=answer, content_type=resp.content_type)
        except (aiohttp.ClientError, OSError):
            if txn:
                self.cut += 1
            return web.Response(status=502)
        finally:
            if txn:
                self.in_flight.clear()


@pytest.mark.timeout(240)
async def test_gateway_killed_mid_transaction_loses_nothing(tmp_path: Path, pytestconfig: pytest.Config,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    await asyncio.to_thread(ensure_synapse_shown, pytestconfig)
    gw_port, proxy_port, synapse_port = free_port(), free_port(), free_port()
    config = msgspec.convert({"homeserver": f"http://127.0.0.1:{synapse_port}", "server_name": SERVER,
                              "as_token": secrets.token_urlsafe(32), "hs_token": secrets.token_urlsafe(32),
                              "appservice_url": f"http://127.0.0.1:{proxy_port}/v1/platforms/hub"}, MatrixConfig)
    reg = tmp_path / "civic-appservice.yaml"
    reg.write_text(registration_yaml(config, "hub"))
    site = Site("site", new_secret(), prefix="s-")
    await site.start()
    proxy = Proxy(proxy_port, f"http://127.0.0.1:{gw_port}")
    await proxy.start()
    synapse = Synapse(tmp_path / "hs", server_name=SERVER, appservices=[reg], port=synapse_port)
    gw: Node | None = None
    try:
        await asyncio.to_thread(synapse.start)
        alice = await asyncio.to_thread(synapse.register_user, "alice")
        room = await asyncio.to_thread(synapse.create_room, alice.token, invite=[f"@civic:{SERVER}"])
        gw = Node("gw", f'[gateway]\nlisten = "127.0.0.1:{gw_port}"\ndatabase = "{tmp_path}/gw.db"\n'
                        f'log_format = "text"\nretry_max_delay = 0.5\n'
                        f'[platforms.hub]\nkind = "matrix"\nhomeserver = "{config.homeserver}"\n'
                        f'server_name = "{SERVER}"\nas_token = "{config.as_token}"\nhs_token = "{config.hs_token}"\n'
                        f'appservice_url = "{config.appservice_url}"\n' + site.config(batch_max=20)
                        + f'[[links]]\nname = "l"\ngroups = [{{platform = "hub", group = "{room}"}}, '
                          f'{{platform = "site", group = "g"}}]\n', gw_port, tmp_path)
        await gw.start()

        def bot_joined() -> bool:
            r = synapse.request("GET", f"/_matrix/client/v3/rooms/{_q(room)}/joined_members", token=alice.token)
            return r.status == 200 and f"@civic:{SERVER}" in r.body["joined"]
        await wait_for(lambda: bot_joined(), timeout=30, what="the bot to join")

        sent: list[str] = []

        def post_all() -> None:
            for i in range(MESSAGES):
                synapse.send_text(alice.token, room, f"message {i}")
                sent.append(f"message {i}")

        poster = asyncio.create_task(asyncio.to_thread(post_all))
        kills = 0
        started = time.monotonic()
        while kills < KILLS and not poster.done():
            try:
                await asyncio.wait_for(proxy.in_flight.wait(), timeout=5)
            except asyncio.TimeoutError:
                continue
            if len(sent) < (kills + 1) * MESSAGES // (KILLS + 2):
                await asyncio.sleep(0.05)  # spread the kills over the load
                continue
            gw.kill()
            kills += 1
            await asyncio.sleep(0.3)
            await gw.start()
        await poster
        await wait_for(lambda: len(site.of_type("civic.message.created")) >= MESSAGES, timeout=120,
                       what=f"all {MESSAGES} messages at the site")
        elapsed = time.monotonic() - started
    finally:
        if gw is not None and gw.alive:
            gw.stop()
        await asyncio.to_thread(synapse.stop)
        await proxy.stop()
        await site.stop()

    texts = [e["data"]["text"] for e in site.of_type("civic.message.created")]
    assert texts == sent, (f"lost, duplicated or reordered messages: got numbers {[t.split()[1] for t in texts]}; "
                           f"gateway log:\n{(tmp_path / 'gw.log').read_text()[-4000:]}")
    assert kills == KILLS and gw.starts == KILLS + 1
    assert proxy.cut >= 1, "no kill landed while a transaction was with the gateway"
    with capsys.disabled():
        print(f"\nmatrix crash test: {MESSAGES} messages, {kills} SIGKILLs, {proxy.cut} transactions cut "
              f"mid-way, all delivered in order in {elapsed:.1f} s")
