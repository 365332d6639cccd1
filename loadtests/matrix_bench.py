"""Matrix relay benchmark: Matrix <-> gateway <-> webhook site, beside Synapse alone.

    python -m loadtests.matrix_bench [--quick] [--messages N] [--rooms K] [--rounds R]
                                     [--site-batch B] [--pause S] [--json PATH] [--keep]

Everything on 127.0.0.1, free ports, in a temporary directory; every process
started here (Synapse, the gateway, the minimal appservice) is stopped by PID
at the end, also on Ctrl-C or an error.

Set-up: one Synapse with SQLite (``tests.synapse.Synapse``, rate limits
relaxed) that loads two appservice registrations: the gateway's, and that of a
*minimal appservice* of this benchmark (``minimal_appservice_app``, run as its
own process with the hidden option ``--minimal-appservice PORT``: it answers
every transaction 200 after counting its events, keeps nothing, relays
nothing). K Matrix users ``bench0..``, K gateway ghosts
``@civic_bench_<i>`` and per user four rooms of theirs: a *linked* room (the
bot ``@civic:civic.test`` invited, it joins by itself, power level 100; ghost i
joined too) that the gateway config links to the webhook group ``g<i>`` of a
real webhook site (``tests.sitekit.Site``, in this process); a *plain* room
with ghost i; a *solo* room with user i alone (no appservice user in it, so
Synapse pushes nothing of it to anyone); a *minimal* room with the minimal
appservice's bot and its ghost i (so Synapse pushes every message of it to the
minimal appservice, as it pushes the linked rooms' to the gateway). The gateway
runs as its own process (``tests.clusterkit.Node``: ``civic-gateway run
--config``) so its CPU is read apart from Synapse's and the minimal
appservice's (utime+stime from ``/proc/PID/stat``). Both appservices stay up
for the whole run; only one is sent to at a time.

Phases, each of N messages spread over the K rooms, K senders at once, each
sending its share serially (one request at a time per room, as the gateway
keeps order per room):

  into, as gateway  baseline of webhook->Matrix: the ghosts send the exact
                    request the gateway sends (as_token, ``?user_id=``,
                    ``?ts=``, ``{"msgtype": "m.text", "body": ...,
                    "m.mentions": {}}``) into the linked rooms, without the
                    gateway in the path. msg/s = N / (last send answered -
                    first send).
  into Synapse      extra line: the ghosts send a plain request (no ``ts``, no
                    ``m.mentions``) into the plain rooms: what the request's
                    shape costs Synapse (it validates ``m.mentions``).
  webhook->Matrix   the site posts N ``civic.message.created`` to the gateway,
                    in batches of B per request, K groups at once; msg/s = N /
                    (all N delivered, from ``civic_events_out_total{platform=
                    "hub"}`` - first post). Counted again in the rooms after.
  out, to a minimal AS
                    baseline of Matrix->webhook: the K users send into the
                    minimal rooms, Synapse pushes each message to the minimal
                    appservice. msg/s = N / (the minimal appservice has all N -
                    first send).
  out of Synapse    extra line: the K users send into their solo rooms (no
                    appservice push). msg/s = N / (last send answered - first
                    send).
  Matrix->webhook   the K users send into the linked rooms; msg/s = N / (the
                    site has all N - first send).

The baselines are the same work for Synapse without the gateway, as the core
benchmark's ``loadtests.minimal_relay`` is the same protocol work without
anything durable. Ratios are gateway / baseline of the same direction, within
one run; PASS needs >= 0.9 and nothing lost or duplicated (exit status 0, else
1). The extra lines show their ratio to the same baseline. With ``--rounds`` >
1 the order alternates (baseline first, then gateway first). Synapse numbers
the transactions of all appservices from one sequence, so the gateway refuses
once (503) the first transaction after the minimal appservice's ones; a
``resync`` message into a linked room takes that outside the measured phases
(after the warm-up and after every minimal-appservice phase). A warm-up message
per room and direction (ghosts registered and joined, profiles cached) precedes
the measurement. ``--keep`` keeps the temporary directory (Synapse's log has
each request's CPU: ``ru=(user, sys)``). Figures and how to read them:
loadtests/README.md, section "Matrix (Synapse) relay".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import aiohttp
import msgspec

from adapters.matrix.config import MatrixConfig
from adapters.matrix.registration import registration_yaml
from loadtests.relay_bench import cpu_seconds, median, own_cpu_seconds, positive_int
from tests.clusterkit import Node
from tests.services import free_port
from tests.sitekit import Sender, Site, new_secret
from tests.synapse import Synapse, ensure_synapse

SERVER = "civic.test"
BOT = f"@civic:{SERVER}"
MARK = re.compile(r"\[mb (\S+)/(\d+)\]")
TEXT = "Buurtoverleg donderdag om acht uur in het wijkcentrum; neem je ideeën voor het plein mee."
INTO, WH2MX, OUT, MX2WH = "into Synapse", "webhook->Matrix", "out of Synapse", "Matrix->webhook"
INTO_GW = "into, as gateway"        # the gateway's own requests, sent without the gateway
OUT_MIN = "out, to a minimal AS"    # Synapse pushing to an appservice that only counts
PAIRS = ((INTO_GW, WH2MX), (OUT_MIN, MX2WH))  # (baseline, through the gateway) per direction: the verdicts
EXTRAS = ((INTO, INTO_GW), (OUT, OUT_MIN))    # (extra line, the baseline it is compared with)
PHASES = (INTO, INTO_GW, WH2MX, OUT, OUT_MIN, MX2WH)
GROUPS = ((INTO, INTO_GW, WH2MX), (OUT, OUT_MIN, MX2WH))  # per direction; reversed in even rounds
THRESHOLD = 0.9
TAGS = {INTO: "in", INTO_GW: "ig", WH2MX: "wm", OUT: "out", OUT_MIN: "om", MX2WH: "mw"}
MINI_BOT, MINI_PREFIX = "benchas", "mini_"  # the minimal appservice's sender and ghost namespace


def q(part: str) -> str:
    return quote(part, safe="")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- a small async Matrix client-server client --------------------------------------------------

class Matrix:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session
        self.retries = 0

    async def call(self, method: str, path: str, body: Any = None, *, token: str,
                   query: dict[str, str] | None = None, ok: tuple[str, ...] = ()) -> Any:
        """JSON of a 2xx answer; 429, 5xx and connection errors retried (20 times);
        an errcode in ``ok`` is returned as that body; any other error raises."""
        headers = {"Authorization": f"Bearer {token}"}
        for attempt in range(20):
            try:
                async with self.session.request(method, self.base + path, json=body, params=query,
                                                headers=headers) as r:
                    data = await r.json(content_type=None)
                    if 200 <= r.status < 300:
                        return data
                    if isinstance(data, dict) and data.get("errcode") in ok:
                        return data
                    if r.status != 429 and r.status < 500:
                        raise RuntimeError(f"{method} {path}: HTTP {r.status} {data}")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            self.retries += 1
            await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt))
        raise RuntimeError(f"{method} {path}: gave up after 20 attempts")

    async def send(self, room: str, text: str, txn: str, *, token: str, user: str | None = None,
                   like_gateway: bool = False) -> str:
        content: dict[str, Any] = {"msgtype": "m.text", "body": text}
        query = {"user_id": user} if user else {}
        if like_gateway:  # adapters.matrix.outbound: m.mentions, and ts (the event's time)
            content["m.mentions"] = {}
            query["ts"] = str(int(time.time() * 1000) - 30)
        done = await self.call("PUT", f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message/{q(txn)}",
                               content, token=token, query=query or None)
        return str(done["event_id"])

    async def bodies(self, room: str, token: str) -> list[tuple[str, str]]:
        """(sender, body) of every m.room.message in the room."""
        out: list[tuple[str, str]] = []
        frm: str | None = None
        while True:
            query = {"dir": "b", "limit": "1000"}
            if frm:
                query["from"] = frm
            page = await self.call("GET", f"/_matrix/client/v3/rooms/{q(room)}/messages", token=token, query=query)
            for e in page.get("chunk", []):
                if e.get("type") == "m.room.message":
                    out.append((e.get("sender", ""), str((e.get("content") or {}).get("body", ""))))
            frm = page.get("end")
            if not page.get("chunk") or not frm:
                return out


# --- the minimal appservice (the baseline of Matrix -> webhook) ----------------------------------

def minimal_appservice_app(hs_token: str) -> Any:
    """An appservice that does nothing but take Synapse's pushes: every ``PUT
    /_matrix/app/v1/transactions/{txnId}`` with the right ``hs_token`` is counted
    (events by their marker, a transaction id seen before not again) and answered
    ``200 {}``; ``POST /_matrix/app/v1/ping`` answers ``200 {}``. ``GET
    /_bench/count`` (same token) tells the benchmark what arrived: per marker tag,
    distinct seqs, deliveries and the ``time.monotonic()`` of the last new one
    (CLOCK_MONOTONIC: the same clock in every process of the machine)."""
    from aiohttp import web

    seen: dict[str, Counter[int]] = {}
    last_new: dict[str, float] = {}
    txns: set[str] = set()
    totals = {"transactions": 0, "replays": 0, "events": 0}
    expected = f"Bearer {hs_token}"

    def refused(request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") == expected or request.query.get("access_token") == hs_token:
            return None
        return web.json_response({"errcode": "M_FORBIDDEN", "error": "wrong hs_token"}, status=403)

    async def transaction(request: web.Request) -> web.Response:
        if (bad := refused(request)) is not None:
            return bad
        txn = request.match_info["txnId"]
        if txn in txns:
            totals["replays"] += 1
            return web.json_response({})
        body = msgspec.json.decode(await request.read())
        now = time.monotonic()
        for ev in body.get("events") or ():
            totals["events"] += 1
            if ev.get("type") != "m.room.message":
                continue
            m = MARK.search(str((ev.get("content") or {}).get("body", "")))
            if m:
                c = seen.setdefault(m.group(1), Counter())
                seq = int(m.group(2))
                if seq not in c:
                    last_new[m.group(1)] = now
                c[seq] += 1
        txns.add(txn)
        totals["transactions"] += 1
        return web.json_response({})

    async def ping(request: web.Request) -> web.Response:
        bad = refused(request)
        return bad if bad is not None else web.json_response({})

    async def count(request: web.Request) -> web.Response:
        if (bad := refused(request)) is not None:
            return bad
        return web.json_response({**totals, "tags": {
            t: [len(c), sum(c.values()), last_new.get(t, 0.0)] for t, c in seen.items()}})

    app = web.Application()
    app.add_routes([web.put("/_matrix/app/v1/transactions/{txnId}", transaction),
                    web.post("/_matrix/app/v1/ping", ping), web.get("/_bench/count", count)])
    return app


def serve_minimal_appservice(port: int) -> None:
    """The minimal appservice's process (``--minimal-appservice PORT``; the
    hs_token in ``MB_HS_TOKEN``): aiohttp on uvloop, like the gateway."""
    from aiohttp import web

    app = minimal_appservice_app(os.environ["MB_HS_TOKEN"])
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, handle_signals=True)


class MinimalAS:
    """The minimal appservice's process, stopped by its PID."""

    def __init__(self, port: int, hs_token: str, workdir: Path) -> None:
        self.port, self.hs_token, self.log = port, hs_token, workdir / "minimal-as.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, session: aiohttp.ClientSession, timeout: float = 30) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loadtests.matrix_bench", "--minimal-appservice", str(self.port)],
                cwd=Path(__file__).resolve().parent.parent, stdout=logf, stderr=logf,
                env={**os.environ, "MB_HS_TOKEN": self.hs_token})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the minimal appservice exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                await self.count(session)
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the minimal appservice did not start")

    async def count(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(self.url + "/_bench/count",
                               headers={"Authorization": f"Bearer {self.hs_token}"}) as r:
            r.raise_for_status()
            return dict(await r.json())

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# --- measurement ----------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    round: int
    messages: int           # accepted (baselines) or that arrived (gateway runs), distinct
    seconds: float
    synapse_cpu: float
    gateway_cpu: float
    bench_cpu: float
    as_cpu: float           # the minimal appservice's process
    lost: int = 0
    duplicates: int = 0
    note: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Rig:
    args: argparse.Namespace
    workdir: Path
    synapse: Synapse
    node: Node
    site: Site
    sender: Sender
    mx: Matrix
    as_token: str
    users: list[tuple[str, str]]            # (user id, token)
    linked: list[str]                       # rooms linked to g<i>
    plain: list[str]                        # rooms without the bot, user i and ghost i
    solo: list[str]                         # rooms of user i alone (no appservice user: no pushes)
    ghosts: list[str]                       # @civic_bench_<i>, member of plain[i] and linked[i]
    mini: MinimalAS                         # the minimal appservice
    mini_rooms: list[str]                   # rooms of user i with the minimal appservice's bot and ghost
    results: list[Phase] = field(default_factory=list)
    _scan: int = 0
    site_seen: dict[str, Counter[int]] = field(default_factory=dict)

    def cpu(self) -> tuple[float, float, float, float]:
        assert self.synapse.proc is not None and self.node.proc is not None and self.mini.proc is not None
        return (cpu_seconds(self.synapse.proc.pid), cpu_seconds(self.node.proc.pid), own_cpu_seconds(),
                cpu_seconds(self.mini.proc.pid))

    def scan_site(self) -> None:
        """Fold newly received site events into ``site_seen[phase][seq]`` (deliveries, redeliveries included)."""
        events = self.site.events
        while self._scan < len(events):
            ev = events[self._scan].event
            self._scan += 1
            if ev.get("type") != "civic.message.created":
                continue
            m = MARK.search(str((ev.get("data") or {}).get("text", "")))
            if m:
                self.site_seen.setdefault(m.group(1), Counter())[int(m.group(2))] += 1
            else:
                self.site_seen.setdefault("?", Counter())[0] += 1

    async def delivered_to_hub(self) -> float:
        return await self.node.metric("civic_events_out_total", platform="hub")

    # -- load --------------------------------------------------------------------------------------
    def shares(self, n: int) -> list[list[int]]:
        k = len(self.linked)
        return [list(range(i, n, k)) for i in range(k)]

    async def matrix_senders(self, tag: str, n: int, rooms: list[str], as_ghost: bool,
                             like_gateway: bool = False) -> tuple[float, float, int]:
        """K senders, each serially into its room; (first send, last answer, accepted).
        ``like_gateway``: the request the gateway makes (``ts`` and ``m.mentions``)."""
        accepted = 0
        last = 0.0

        async def worker(i: int, seqs: list[int]) -> None:
            nonlocal accepted, last
            user, token = self.users[i]
            for seq in seqs:
                if as_ghost:
                    await self.mx.send(rooms[i], f"[mb {tag}/{seq}] {TEXT}", f"{tag}-{seq}", token=self.as_token,
                                       user=self.ghosts[i], like_gateway=like_gateway)
                else:
                    await self.mx.send(rooms[i], f"[mb {tag}/{seq}] {TEXT}", f"{tag}-{seq}", token=token)
                accepted += 1
            last = max(last, time.monotonic())

        t0 = time.monotonic()
        await asyncio.gather(*(worker(i, seqs) for i, seqs in enumerate(self.shares(n))))
        return t0, last, accepted

    async def site_posts(self, tag: str, n: int) -> float:
        """The site posts seqs of group i in batches, K groups at once; the time of the first post."""
        batch = self.args.site_batch

        async def worker(i: int, seqs: list[int]) -> None:
            for start in range(0, len(seqs), batch):
                events = [self.sender.event("civic.message.created", f"g{i}", {
                    "id": f"{tag}-{seq}", "author": {"id": f"poster{i}", "name": f"Poster {i}",
                                                      "identity": "pseudonymous"},
                    "text": f"[mb {tag}/{seq}] {TEXT}"}, event_id=f"ev-{tag}-{seq}") for seq in seqs[start:start + batch]]
                for attempt in range(20):
                    status, body = await self.sender.send(events, batch=len(events) > 1)
                    if 200 <= status < 300:
                        break
                    if status not in (408, 429) and status < 500:
                        raise RuntimeError(f"the gateway refused a post: {status} {body}")
                    await asyncio.sleep(0.1 * (attempt + 1))
                else:
                    raise RuntimeError("the gateway kept refusing posts")

        t0 = time.monotonic()
        await asyncio.gather(*(worker(i, seqs) for i, seqs in enumerate(self.shares(n))))
        return t0

    async def until(self, check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str,
                    every: float = 0.02) -> float:
        deadline = time.monotonic() + timeout
        while True:
            v = check()
            if asyncio.iscoroutine(v):
                v = await v
            if v:
                return time.monotonic()
            if self.node.proc is None or self.node.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.node.tail()}")
            if self.mini.proc is None or self.mini.proc.poll() is not None:
                raise RuntimeError("the minimal appservice exited")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(every)

    # -- phases ------------------------------------------------------------------------------------
    async def gateway_counters(self) -> tuple[float, float]:
        """(transaction gaps refused, calls to the homeserver) of the gateway so far."""
        return (await self.node.metric("civic_matrix_transaction_gaps_total", platform="hub"),
                await self.node.metric("civic_matrix_api_calls_total", platform="hub"))

    async def resync(self, tag: str) -> None:
        """One message into a linked room, waited for at the site. Synapse numbers the
        transactions of all its appservices from one sequence, so after the minimal
        appservice's the gateway's next transaction skips ids; the gateway refuses it
        once (503) and Synapse resends it after its recovery (a ping from the gateway
        or 2 s). This takes that hiccup here, outside any measured phase."""
        gaps0, _ = await self.gateway_counters()
        await self.mx.send(self.linked[0], f"[mb {tag}/0] {TEXT}", f"{tag}-0", token=self.users[0][1])

        def arrived() -> bool:
            self.scan_site()
            return bool(self.site_seen.get(tag))
        t0 = time.monotonic()
        t1 = await self.until(arrived, 60, f"the resync message {tag} at the site")
        gaps1, _ = await self.gateway_counters()
        log(f"resync after the minimal appservice: at the site in {t1 - t0:.1f} s, "
            f"{gaps1 - gaps0:.0f} transaction gap(s) refused by the gateway")

    async def run_phase(self, name: str, rnd: int, n: int) -> Phase:
        tag = f"{TAGS[name]}{rnd}"
        gw0 = await self.gateway_counters()
        c0 = self.cpu()
        lost = dup = 0
        note = ""
        if name == INTO:
            t0, t1, got = await self.matrix_senders(tag, n, self.plain, as_ghost=True)
        elif name == INTO_GW:
            t0, t1, got = await self.matrix_senders(tag, n, self.linked, as_ghost=True, like_gateway=True)
        elif name == OUT:
            t0, t1, got = await self.matrix_senders(tag, n, self.solo, as_ghost=False)
        elif name == OUT_MIN:
            before = await self.mini.count(self.mx.session)
            counted: dict[str, Any] = {}

            async def all_at_mini() -> bool:
                nonlocal counted
                counted = await self.mini.count(self.mx.session)
                return int(counted["tags"].get(tag, [0])[0]) >= n
            t0, sent_done, _ = await self.matrix_senders(tag, n, self.mini_rooms, as_ghost=False)
            await self.until(all_at_mini, self.args.timeout, f"{n} messages at the minimal appservice", every=0.1)
            distinct, deliveries, t1 = counted["tags"][tag]  # t1: when the last new one arrived there
            got, dup, lost = int(distinct), int(deliveries) - int(distinct), n - int(distinct)
            note = (f"all sends answered after {sent_done - t0:.1f} s; "
                    f"{counted['transactions'] - before['transactions']} transactions")
        elif name == WH2MX:
            base = await self.delivered_to_hub()
            t0 = await self.site_posts(tag, n)
            posted = time.monotonic()

            async def all_in() -> bool:
                return await self.delivered_to_hub() >= base + n
            t1 = await self.until(all_in, self.args.timeout, f"{n} deliveries into Matrix", every=0.05)
            got = n
            note = f"all posts accepted after {posted - t0:.1f} s"
        else:  # MX2WH
            def all_at_site() -> bool:
                self.scan_site()
                return len(self.site_seen.get(tag, ())) >= n
            txns0 = await self.node.metric("civic_matrix_transactions_total", platform="hub")
            t0, sent_done, _ = await self.matrix_senders(tag, n, self.linked, as_ghost=False)
            t1 = await self.until(all_at_site, self.args.timeout, f"{n} messages at the site")
            got = len(self.site_seen[tag])
            dup = sum(c - 1 for c in self.site_seen[tag].values())
            lost = n - got
            txns = await self.node.metric("civic_matrix_transactions_total", platform="hub") - txns0
            note = f"all sends answered after {sent_done - t0:.1f} s; {txns:.0f} transactions"
        c1 = self.cpu()
        gw1 = await self.gateway_counters()
        note += (("; " if note else "") + f"gateway: {gw1[1] - gw0[1]:.0f} calls to Synapse, "
                 f"{gw1[0] - gw0[0]:.0f} transaction gaps refused")
        p = Phase(name, rnd, got, t1 - t0, c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2], c1[3] - c0[3],
                  lost, dup, note)
        self.results.append(p)
        log(f"round {rnd} {name:20} {p.messages:5} msgs in {p.seconds:6.2f} s = {p.rate:6.1f} msg/s; CPU s: "
            f"Synapse {p.synapse_cpu:.1f} ({1000 * p.synapse_cpu / max(1, got):.1f} ms/msg), gateway "
            f"{p.gateway_cpu:.1f} ({1000 * p.gateway_cpu / max(1, got):.1f} ms/msg), minimal AS "
            f"{p.as_cpu:.1f} ({1000 * p.as_cpu / max(1, got):.1f} ms/msg), bench {p.bench_cpu:.1f}"
            + (f"; {note}" if note else ""))
        if name == OUT_MIN:
            await self.resync(f"sync{rnd}")
        await asyncio.sleep(self.args.pause)  # let Synapse's appservice pushes of this phase settle
        return p

    async def verify_rooms(self) -> dict[str, tuple[int, int]]:
        """(distinct, duplicates) per webhook->Matrix tag, counted in the linked rooms as the ghosts' messages."""
        seen: dict[str, Counter[int]] = {}
        for i, room in enumerate(self.linked):
            for sender, body in await self.mx.bodies(room, self.users[i][1]):
                m = MARK.search(body)
                if m and m.group(1).startswith("wm") and sender.startswith("@civic_"):
                    seen.setdefault(m.group(1), Counter())[int(m.group(2))] += 1
        return {tag: (len(c), sum(v - 1 for v in c.values())) for tag, c in seen.items()}


# --- set-up ---------------------------------------------------------------------------------------

async def wait_joined(mx: Matrix, rooms: list[str], users: list[tuple[str, str]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for i, room in enumerate(rooms):
        while True:
            r = await mx.call("GET", f"/_matrix/client/v3/rooms/{q(room)}/joined_members", token=users[i][1])
            if BOT in r.get("joined", {}):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bot did not join {room}")
            await asyncio.sleep(0.1)


def gateway_config(port: int, workdir: Path, cfg: MatrixConfig, site: Site, rooms: list[str]) -> str:
    text = (f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "{workdir}/gw.db"\nlog_format = "text"\n'
            f'log_level = "warning"\nretry_max_delay = 1.0\n'
            f'[platforms.hub]\nkind = "matrix"\nhomeserver = "{cfg.homeserver}"\nserver_name = "{SERVER}"\n'
            f'as_token = "{cfg.as_token}"\nhs_token = "{cfg.hs_token}"\nappservice_url = "{cfg.appservice_url}"\n'
            + site.config(batch_max=20))
    for i, room in enumerate(rooms):
        text += (f'[[links]]\nname = "l{i}"\ngroups = [{{platform = "hub", group = "{room}"}}, '
                 f'{{platform = "site", group = "g{i}"}}]\n')
    return text


async def setup(args: argparse.Namespace, workdir: Path, stack: contextlib.AsyncExitStack) -> Rig:
    gw_port, hs_port = free_port(), free_port()
    cfg = msgspec.convert({"homeserver": f"http://127.0.0.1:{hs_port}", "server_name": SERVER,
                           "as_token": secrets.token_urlsafe(32), "hs_token": secrets.token_urlsafe(32),
                           "appservice_url": f"http://127.0.0.1:{gw_port}/v1/platforms/hub"}, MatrixConfig)
    reg = workdir / "civic-appservice.yaml"
    reg.write_text(registration_yaml(cfg, "hub"))
    # the minimal appservice: a second registration, its own bot and ghost namespace, its own port
    mini_port = free_port()
    mini_cfg = msgspec.convert({"homeserver": f"http://127.0.0.1:{hs_port}", "server_name": SERVER,
                                "as_token": secrets.token_urlsafe(32), "hs_token": secrets.token_urlsafe(32),
                                "appservice_url": f"http://127.0.0.1:{mini_port}", "id": "minimal-appservice",
                                "bot_localpart": MINI_BOT, "ghost_prefix": MINI_PREFIX}, MatrixConfig)
    mini_reg = workdir / "minimal-appservice.yaml"
    mini_reg.write_text(registration_yaml(mini_cfg))
    await asyncio.to_thread(ensure_synapse)
    synapse = Synapse(workdir / "hs", server_name=SERVER, appservices=[reg, mini_reg], port=hs_port)
    stack.callback(synapse.stop)
    log(f"starting Synapse on :{hs_port}")
    await asyncio.to_thread(synapse.start)

    site = Site("site", new_secret(), prefix="s-")
    await site.start()
    stack.push_async_callback(site.stop)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=60))
    stack.push_async_callback(session.close)
    mx = Matrix(synapse.url, session)
    mini = MinimalAS(mini_port, mini_cfg.hs_token, workdir)
    stack.callback(mini.stop)
    log(f"starting the minimal appservice on :{mini_port}")
    await mini.start(session)

    k = args.rooms
    log(f"{k} users; each with a linked room (bot invited), a plain room, a solo room, a minimal-AS room")
    users = []
    for i in range(k):
        u = await asyncio.to_thread(synapse.register_user, f"bench{i}")
        users.append((u.user_id, u.token))

    async def rooms_of(i: int) -> tuple[str, str, str, str, str]:
        uid, token = users[i]
        linked = (await mx.call("POST", "/_matrix/client/v3/createRoom",
                                {"room_version": "12", "preset": "private_chat", "invite": [BOT],
                                 "name": f"linked {i}"}, token=token))["room_id"]
        path = f"/_matrix/client/v3/rooms/{q(linked)}/state/m.room.power_levels"
        levels = await mx.call("GET", path, token=token)
        levels.setdefault("users", {})[BOT] = 100
        await mx.call("PUT", path + "/", levels, token=token)
        plain = (await mx.call("POST", "/_matrix/client/v3/createRoom",
                               {"room_version": "12", "preset": "private_chat", "name": f"plain {i}"},
                               token=token))["room_id"]
        solo = (await mx.call("POST", "/_matrix/client/v3/createRoom",
                              {"room_version": "12", "preset": "private_chat", "name": f"solo {i}"},
                              token=token))["room_id"]
        ghost = f"@civic_bench_{i}:{SERVER}"
        await mx.call("POST", "/_matrix/client/v3/register",
                      {"type": "m.login.application_service", "username": f"civic_bench_{i}", "inhibit_login": True},
                      token=cfg.as_token, ok=("M_USER_IN_USE",))
        for room in (plain, linked):
            await mx.call("POST", f"/_matrix/client/v3/rooms/{q(room)}/invite", {"user_id": ghost}, token=token)
            await mx.call("POST", f"/_matrix/client/v3/join/{q(room)}", {}, token=cfg.as_token,
                          query={"user_id": ghost})
        # the minimal appservice's room: its bot (power level 100) and its ghost i, like the linked room
        mini_bot, mini_ghost = f"@{MINI_BOT}:{SERVER}", f"@{MINI_PREFIX}bench_{i}:{SERVER}"
        mini_room = (await mx.call("POST", "/_matrix/client/v3/createRoom",
                                   {"room_version": "12", "preset": "private_chat", "invite": [mini_bot],
                                    "name": f"minimal {i}"}, token=token))["room_id"]
        path = f"/_matrix/client/v3/rooms/{q(mini_room)}/state/m.room.power_levels"
        levels = await mx.call("GET", path, token=token)
        levels.setdefault("users", {})[mini_bot] = 100
        await mx.call("PUT", path + "/", levels, token=token)
        await mx.call("POST", f"/_matrix/client/v3/join/{q(mini_room)}", {}, token=mini_cfg.as_token)
        await mx.call("POST", "/_matrix/client/v3/register",
                      {"type": "m.login.application_service", "username": f"{MINI_PREFIX}bench_{i}",
                       "inhibit_login": True}, token=mini_cfg.as_token, ok=("M_USER_IN_USE",))
        await mx.call("POST", f"/_matrix/client/v3/rooms/{q(mini_room)}/invite", {"user_id": mini_ghost},
                      token=token)
        await mx.call("POST", f"/_matrix/client/v3/join/{q(mini_room)}", {}, token=mini_cfg.as_token,
                      query={"user_id": mini_ghost})
        return linked, plain, solo, ghost, mini_room

    made = await asyncio.gather(*(rooms_of(i) for i in range(k)))
    linked, plain, solo, ghosts, mini_rooms = ([m[j] for m in made] for j in range(5))

    node = Node("gateway", gateway_config(gw_port, workdir, cfg, site, linked), gw_port, workdir)
    stack.callback(node.stop)
    log(f"starting the gateway on :{gw_port}")
    await node.start()
    await wait_joined(mx, linked, users)
    sender = Sender(node.url, "site", site.secret)
    stack.push_async_callback(sender.close)
    rig = Rig(args, workdir, synapse, node, site, sender, mx, cfg.as_token, users, linked, plain, solo, ghosts,
              mini, mini_rooms)

    # warm-up: one message per room and direction (ghosts registered and joined, names and profiles cached)
    log("warm-up")
    await rig.matrix_senders("warm", k, plain, as_ghost=True)
    await rig.matrix_senders("warmig", k, linked, as_ghost=True, like_gateway=True)
    await rig.matrix_senders("warm", k, solo, as_ghost=False)
    base = await rig.delivered_to_hub()
    await rig.site_posts("warmwm", k)
    await rig.until(lambda: _ge(rig.delivered_to_hub(), base + k), 60, "the warm-up into Matrix", every=0.05)
    await rig.matrix_senders("warmmw", k, linked, as_ghost=False)

    def warm_at_site() -> bool:
        rig.scan_site()
        return len(rig.site_seen.get("warmmw", ())) >= k
    await rig.until(warm_at_site, 60, "the warm-up at the site")
    await rig.matrix_senders("warmom", k, mini_rooms, as_ghost=False)

    async def warm_at_mini() -> bool:
        return int((await mini.count(session))["tags"].get("warmom", [0])[0]) >= k
    await rig.until(warm_at_mini, 60, "the warm-up at the minimal appservice", every=0.1)
    await rig.resync("sync0")
    await asyncio.sleep(args.pause)
    return rig


async def _ge(value: Awaitable[float], bound: float) -> bool:
    return await value >= bound


# --- report ---------------------------------------------------------------------------------------

def summary(results: list[Phase]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in PHASES:
        ps = [p for p in results if p.name == name]
        if not ps:
            continue
        n = sum(p.messages for p in ps)
        out[name] = {"messages": n, "seconds": sum(p.seconds for p in ps), "rate": median([p.rate for p in ps]),
                     "synapse_cpu": sum(p.synapse_cpu for p in ps), "gateway_cpu": sum(p.gateway_cpu for p in ps),
                     "bench_cpu": sum(p.bench_cpu for p in ps), "as_cpu": sum(p.as_cpu for p in ps),
                     "lost": sum(p.lost for p in ps),
                     "duplicates": sum(p.duplicates for p in ps),
                     "rates": [round(p.rate, 1) for p in ps]}  # type: ignore[dict-item]
    return out


def print_table(results: list[Phase], args: argparse.Namespace) -> bool:
    s = summary(results)
    ratio: dict[str, float] = {}
    for base, gw in PAIRS:
        if base in s and gw in s:
            ratio[gw] = s[gw]["rate"] / s[base]["rate"]
            ratio[base] = 1.0
    for extra, base in EXTRAS:
        if extra in s and base in s:
            ratio[extra] = s[extra]["rate"] / s[base]["rate"]
    print()
    print(f"Matrix relay benchmark: {args.rooms} rooms, {args.messages} messages per phase, {args.rounds} round(s), "
          f"site batches of {args.site_batch}; msg/s is the median over rounds; ratio: to the baseline of the "
          f"direction ('{PAIRS[0][0]}', '{PAIRS[1][0]}')")
    head = (f"{'phase':20} {'messages':>8} {'seconds':>8} {'msg/s':>7} {'ratio':>6} {'Synapse CPU s':>13} "
            f"{'gateway CPU s':>13} {'min. AS CPU s':>13} {'bench CPU s':>11} {'Synapse ms/msg':>14} "
            f"{'gateway ms/msg':>14} {'min. AS ms/msg':>14} {'lost':>4} {'dup':>4}  rounds")
    print(head)
    print("-" * len(head))
    for name in PHASES:
        if name not in s:
            continue
        r = s[name]
        n = max(1, r["messages"])
        print(f"{name:20} {r['messages']:8.0f} {r['seconds']:8.2f} {r['rate']:7.1f} "
              f"{ratio.get(name, float('nan')):6.2f} {r['synapse_cpu']:13.1f} {r['gateway_cpu']:13.1f} "
              f"{r['as_cpu']:13.1f} {r['bench_cpu']:11.1f} {1000 * r['synapse_cpu'] / n:14.1f} "
              f"{1000 * r['gateway_cpu'] / n:14.1f} {1000 * r['as_cpu'] / n:14.1f} "
              f"{r['lost']:4.0f} {r['duplicates']:4.0f}  {r['rates']}")
    ok = True
    for base, gw in PAIRS:
        if gw not in ratio:
            continue
        clean = all(s[x]["lost"] == 0 and s[x]["duplicates"] == 0 for x in (base, gw))
        good = ratio[gw] >= THRESHOLD and clean
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}: {gw}: gateway not the bottleneck (ratio {ratio[gw]:.3f} to "
              f"'{base}', needs >= {THRESHOLD}), lost {s[gw]['lost']:.0f}, duplicates {s[gw]['duplicates']:.0f}"
              + ("" if clean else f" (baseline: lost {s[base]['lost']:.0f}, duplicates {s[base]['duplicates']:.0f})"))
    for extra, base in EXTRAS:
        if extra in ratio:
            print(f"  extra: '{extra}' ran at {ratio[extra]:.2f} of '{base}' (Synapse "
                  f"{1000 * s[extra]['synapse_cpu'] / max(1, s[extra]['messages']):.1f} vs "
                  f"{1000 * s[base]['synapse_cpu'] / max(1, s[base]['messages']):.1f} ms of CPU per message)")
    return ok


# --- main -----------------------------------------------------------------------------------------

async def main_async(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # unwind: every process started is stopped by PID
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="matrix-bench-"))
    started = time.monotonic()
    ok = False
    try:
        async with contextlib.AsyncExitStack() as stack:
            rig = await setup(args, workdir, stack)
            for rnd in range(1, args.rounds + 1):
                for group in GROUPS:
                    for name in (group if rnd % 2 else group[::-1]):
                        await rig.run_phase(name, rnd, args.messages)
            # webhook -> Matrix: count what the rooms hold
            counts = await rig.verify_rooms()
            for p in rig.results:
                if p.name == WH2MX:
                    tag = f"wm{p.round}"
                    distinct, dup = counts.get(tag, (0, 0))
                    p.lost, p.duplicates = args.messages - distinct, dup
                    p.note += f"; in the rooms: {distinct} distinct, {dup} duplicates"
            rig.scan_site()
            stray = {t: sum(c.values()) for t, c in rig.site_seen.items() if not t.startswith(("mw", "warmmw", "sync"))}
            if stray:
                log(f"ODD: the site received messages of other phases: {stray}")
            at_mini = (await rig.mini.count(rig.mx.session))
            stray = {t: c[1] for t, c in at_mini["tags"].items() if not t.startswith(("om", "warmom"))}
            if stray:
                log(f"ODD: the minimal appservice received messages of other phases: {stray}")
            log(f"the minimal appservice: {at_mini['transactions']} transactions, {at_mini['events']} events, "
                f"{at_mini['replays']} replayed transactions")
            ok = print_table(rig.results, args)
            sy = rig.synapse.proc.pid if rig.synapse.proc else 0
            log(f"Matrix client retries (429/5xx/connection): {rig.mx.retries}; Synapse pid {sy}, "
                f"gateway pid {rig.node.proc.pid if rig.node.proc else 0}, minimal appservice pid "
                f"{rig.mini.proc.pid if rig.mini.proc else 0}; {time.monotonic() - started:.0f} s in all")
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "phases": [
                    {**asdict(p), "rate": p.rate} for p in rig.results], "summary": summary(rig.results)}, indent=1))
    finally:
        if args.keep:
            log(f"kept {workdir} (Synapse log: hs/synapse.log, gateway log: gateway.log, "
                f"minimal appservice: minimal-as.log)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="400 messages per phase, one round")
    ap.add_argument("--messages", type=positive_int, help="messages per phase (default 2000, quick 400)")
    ap.add_argument("--rooms", type=positive_int, default=8, help="rooms = concurrent senders (default 8)")
    ap.add_argument("--rounds", type=positive_int, help="rounds of the six phases (default 1)")
    ap.add_argument("--site-batch", type=positive_int, default=5, help="events per webhook post (default 5)")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between phases (default 2)")
    ap.add_argument("--timeout", type=float, default=600.0, help="longest wait for a phase to drain")
    ap.add_argument("--json", help="also write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    ap.add_argument("--minimal-appservice", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.minimal_appservice:
        serve_minimal_appservice(args.minimal_appservice)
        return
    args.messages = args.messages or (400 if args.quick else 2000)
    args.rounds = args.rounds or 1
    try:
        code = asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; the processes it started are stopped", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
