"""Crash test: the gateway process is SIGKILLed again and again while a load of
messages flows and one target keeps going down. Every message the gateway
accepted (answered 202) must reach every target, in order per group, and a
redelivery must carry the same webhook-id as the first delivery.

Scale with CIVIC_SOAK_SCALE (default 1: 2,000 messages, 5 kills)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from tests.clusterkit import Node
from tests.sitekit import Sender, Site, free_port, new_secret, wait_for

SCALE = float(os.environ.get("CIVIC_SOAK_SCALE", "1"))
MESSAGES = int(2000 * SCALE)
KILLS = max(5, int(5 * SCALE))
GROUPS = 8


async def test_sigkill_during_load_loses_nothing_and_keeps_order(tmp_path: Path, capsys) -> None:
    a = Site("a", new_secret(), "a-")
    b = Site("b", new_secret(), "b-")
    c = Site("c", new_secret(), "c-")
    for s in (b, c):
        await s.start()
    port = free_port()
    links = "".join(
        f'[[links]]\nname = "l{g}"\ngroups = [{{platform = "a", group = "g{g}"}}, {{platform = "b", group = "g{g}"}},'
        f' {{platform = "c", group = "g{g}"}}]\n' for g in range(GROUPS))
    gw = Node("gw", f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "{tmp_path}/gw.db"\nlog_format = "text"\n'
              f'retry_max_delay = 0.3\n' + a.config() + b.config(batch_max=20) + c.config(batch_max=1) + links,
              port, tmp_path)
    await gw.start()
    sender = Sender(f"http://127.0.0.1:{port}", "a", a.secret)
    accepted: dict[int, list[str]] = {g: [] for g in range(GROUPS)}
    refused = 0

    async def load_group(g: int) -> None:
        nonlocal refused
        for i in range(g, MESSAGES, GROUPS):
            ev = sender.event("civic.message.created", f"g{g}",
                              {"id": f"m{i}", "author": {"id": "u1", "name": "Una"}, "text": f"message {i}"},
                              event_id=f"ev-{i}")
            while True:  # a site retries the same event until the gateway takes it
                try:
                    status, _ = await sender.send([ev])
                except (aiohttp.ClientError, OSError):
                    status = 0
                if status == 202:
                    accepted[g].append(ev["id"])
                    break
                refused += 1
                await asyncio.sleep(0.05)

    async def chaos() -> None:
        for k in range(KILLS):
            await asyncio.sleep(0.6 + 0.2 * (k % 3))
            c.fail_with = 503 if k % 2 == 0 else None  # c is partly down
            gw.kill()
            await gw.start()
        c.fail_with = None

    try:
        loaders = asyncio.gather(*(load_group(g) for g in range(GROUPS)))
        await asyncio.gather(loaders, chaos())
        total = sum(len(v) for v in accepted.values())
        assert total == MESSAGES
        for site in (b, c):
            await wait_for(lambda site=site: len(site.seen) >= MESSAGES, timeout=120,
                           what=f"all messages at {site.name}")
    finally:
        gw.stop()
        await sender.close()
        for s in (b, c):
            await s.stop()

    assert gw.starts == KILLS + 1
    assert refused > 0, "the load ended before the kills: the test did not kill the gateway mid-load"
    redeliveries = {}
    for site in (b, c):
        by_group: dict[str, list[str]] = {}
        first_wid: dict[str, str] = {}
        dupes = 0
        for r in site.events:
            ev_id = r.event["id"]
            origin_id = r.event["data"]["text"]
            if ev_id in first_wid:
                dupes += 1
                if site is c:  # single-event deliveries: the webhook-id is the delivery's own id
                    assert r.webhook_id == first_wid[ev_id], "a redelivery changed its webhook-id"
                continue
            first_wid[ev_id] = r.webhook_id
            by_group.setdefault(r.event["subject"], []).append(origin_id)
        for g in range(GROUPS):
            expected = [f"message {eid.split('-')[1]}" for eid in accepted[g]]
            assert by_group[f"g{g}"] == expected, f"order broken at {site.name}/g{g}"
        redeliveries[site.name] = dupes
    with capsys.disabled():  # shown in every run, not only when the test fails
        print(f"\ncrash test: {MESSAGES} messages, {KILLS} SIGKILLs, {refused} sends refused while down; "
              f"redeliveries caused by the crashes: b={redeliveries['b']}, c={redeliveries['c']} "
              f"(of {2 * MESSAGES} deliveries)")
