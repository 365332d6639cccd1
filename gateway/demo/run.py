"""``civic-gateway demo``: the embedded gateway plus two linked demo sites.

A neighbourhood group and a patient group, each a small real webhook site
(``gateway.demo.site``), linked to each other through the gateway. Post in
one browser tab and watch it appear in the other; watch ``/metrics`` move.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
import os
import signal
import sys
import tempfile
import webbrowser
from pathlib import Path

from gateway import logs
from gateway.config import parse
from gateway.demo.site import make_site_app, start_site
from gateway.errors import GatewayError
from gateway.runtime import Gateway
from gateway.web.server import port_taken

log = logging.getLogger("civic.demo")

SITES = (
    ("buurt", "Buurtgroep De Linde", "neighbourhood", "linde-general"),
    ("patients", "Patiëntenvereniging Samen Sterk", "patients", "lounge"),
)


def demo_config(port: int, data_dir: Path, secrets: dict[str, str]) -> str:
    lines = [f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "{data_dir / "demo.db"}"\n'
             f'admin_token = "demo"\nlog_format = "text"\nretry_max_delay = 5\n']
    groups = []
    for i, (name, _title, _theme, group) in enumerate(SITES, start=1):
        lines.append(f'[platforms.{name}]\nkind = "webhook"\nsecret = "{secrets[name]}"\n'
                     f'url = "http://127.0.0.1:{port + i}/civic/inbox"\n')
        groups.append(f'{{platform = "{name}", group = "{group}"}}')
    lines.append(f'[[links]]\nname = "demo"\ngroups = [{", ".join(groups)}]\n')
    return "\n".join(lines)


def busy_port(taken: int, port: int) -> GatewayError:
    """The error for a demo port that another process holds."""
    return GatewayError(f"port {taken} on 127.0.0.1 is in use: pass --port N to use other ports "
                        f"(the demo takes N, N+1 and N+2; now {port}..{port + len(SITES)})")


async def run_demo(port: int = 8080, data_dir: str | None = None, open_browser: bool = True) -> None:
    logs.setup("text", "info")
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="civic-demo-")
        data_dir = tmp.name
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    secrets = {name: "whsec_" + base64.b64encode(os.urandom(24)).decode() for name, *_ in SITES}
    ports = [port + i for i in range(len(SITES) + 1)]
    for p in ports:  # before anything starts
        if await port_taken("127.0.0.1", p):
            raise busy_port(p, port)
    gw = Gateway(parse(demo_config(port, Path(data_dir), secrets), "<demo>"))
    await gw.start()
    runner = None
    site_runners = []
    urls = []
    binding = port
    try:
        runner = await gw.serve("127.0.0.1", port)
        for i, (name, title, theme, group) in enumerate(SITES, start=1):
            binding = port + i
            app = make_site_app(title=title, platform=name, group=group, gateway_url=f"http://127.0.0.1:{port}",
                                secret=secrets[name], theme=theme)
            site_runners.append(await start_site(app, "127.0.0.1", binding))
            urls.append((title, f"http://127.0.0.1:{binding}/"))
    except OSError as exc:  # a port taken since port_taken looked
        for r in site_runners:
            await r.cleanup()
        if runner is not None:
            await runner.cleanup()
        await gw.stop()
        if tmp is not None:
            tmp.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise busy_port(binding, port) from None
        raise
    print("\ncivic-gateway demo is running. Open both sites side by side:")
    for title, url in urls:
        print(f"  {title:34} {url}")
    print(f"  {'metrics':34} http://127.0.0.1:{port}/metrics")
    print(f"  {'moderation log (public)':34} http://127.0.0.1:{port}/v1/moderation-log")
    print(f"  {'admin API (token: demo)':34} http://127.0.0.1:{port}/admin/v1/status")
    print("Press Ctrl+C to stop.\n")
    has_screen = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if open_browser and has_screen:  # on a server, never start a text-mode browser in the terminal
        for _title, url in urls:
            try:
                webbrowser.open(url)
            except Exception:  # no browser on a server: the addresses are printed above
                pass
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for r in site_runners:
            await r.cleanup()
        await runner.cleanup()
        await gw.stop()
        if tmp is not None:
            tmp.cleanup()
