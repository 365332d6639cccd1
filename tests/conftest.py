from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.runtime import Gateway  # noqa: E402
from gateway.config import parse  # noqa: E402
from tests.sitekit import Sender, Site, free_port, new_secret  # noqa: E402


@dataclass
class Net:
    """A running gateway with linked sites, for end-to-end tests."""

    gw: Gateway
    url: str
    sites: dict[str, Site]
    senders: dict[str, Sender]
    admin_token: str


async def start_net(tmp_path: Path, names: list[str], *, extra_gateway: str = "", batch_max: int = 20,
                    links: str | None = None) -> Net:
    sites = {n: Site(n, new_secret(), prefix=f"{n}{n}-") for n in names}
    for s in sites.values():
        await s.start()
    port = free_port()
    token = "t0ken-" + os.urandom(4).hex()
    if links is None:
        groups = ", ".join(f'{{platform = "{n}", group = "g-{n}"}}' for n in names)
        links = f'[[links]]\nname = "together"\ngroups = [{groups}]\n'
    text = (f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "{tmp_path}/gw.db"\nadmin_token = "{token}"\n'
            f'log_format = "text"\nretry_max_delay = 0.5\n{extra_gateway}\n'
            + "".join(s.config(batch_max=batch_max) for s in sites.values()) + links)
    gw = Gateway(parse(text, "test.toml"))
    await gw.start()
    await gw.serve("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    senders = {n: Sender(url, n, s.secret) for n, s in sites.items()}
    return Net(gw, url, sites, senders, token)


async def stop_net(net: Net) -> None:
    for s in net.senders.values():
        await s.close()
    if net.gw._runner is not None:
        await net.gw._runner.cleanup()
    await net.gw.stop()
    for s in net.sites.values():
        await s.stop()


@pytest.fixture
async def net3(tmp_path: Path) -> AsyncIterator[Net]:
    net = await start_net(tmp_path, ["a", "b", "c"])
    try:
        yield net
    finally:
        await stop_net(net)
