"""ActivityPub benchmark: signed activities into a hosted group, and the group's deliveries out.

    python -m loadtests.ap_bench [--quick] [--activities N] [--messages M] [--actors K] [--hosts H]
                                 [--concurrency C] [--inbox-delay MS] [--no-rfc9421] [--json PATH] [--keep]

Everything on 127.0.0.1, free ports, in a temporary directory; every process
started here (the gateway, the fake fediverse) is stopped by PID at the end,
also on Ctrl-C or an error.

Set-up: the gateway as its own process (``tests.clusterkit.Node``,
``civic-gateway run --config``, SQLite) with an ``activitypub`` platform
hosting the group ``club`` (``allow_private_addresses = true``), linked to a
webhook site (``tests.sitekit.Site``, in this process, ``batch_max = 20``).
A fake fediverse runs as a *separate process* (this module with
``--fediverse SPEC``): H hosts (aiohttp servers on H ports: H distinct hosts
to the gateway), K actors spread over them, each with its own RSA key, an
actor document (with ``endpoints.sharedInbox``) and an inbox. Every POST to a
fake inbox is checked against the gateway group's public key (draft-cavage,
fetched from the gateway once) and counted. Its counts are read over HTTP
(``GET /_stats``). Every actor first follows the group (signed ``Follow``, the
gateway answers ``Accept``), so the gateway has fetched and cached every
actor's key before anything is measured.

Phases:

  in-cavage   N signed ``Create{Note}`` (draft-cavage, as Mastodon signs) from
              the K actors round-robin, posted to ``/ap/groups/club/inbox`` by
              C concurrent senders. The requests are signed *before* the phase
              (outside the timing), so the bench's RSA signing does not count.
              accepted/s = 202s / (last answer - first post); p50/p99 of the
              POSTs; relay = time until the site has all N. The group also
              announces every accepted activity to its followers (H shared
              inboxes each, the actor excluded), and the phase ends when
              those N x H deliveries arrived too.
  in-rfc9421  the same with RFC 9421 signatures (``sign_rfc9421``).
  out         the site posts M ``civic.message.created`` (batches of 10, 4 in
              flight); the group announces each to every follower's inbox,
              deduplicated to one shared inbox per host: M x H deliveries.
              deliveries/s = M x H / (last arrival - first post).

CPU per phase is utime+stime from ``/proc/PID/stat`` of the gateway, of the
fake fediverse and of this process (generator + webhook site); "other" is
what the rest of the machine used (e.g. another benchmark). Refusals and
delivery outcomes come from the gateway's ``/metrics``
(``civic_activitypub_refused_total``, ``civic_activitypub_deliveries_total``).
Exit status 1 if anything was refused, lost or duplicated. Figures and how to
read them: loadtests/README.md, section "ActivityPub".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import orjson

from adapters.activitypub import signatures as sig
from loadtests.relay_bench import cpu_seconds, machine_busy_seconds, own_cpu_seconds, percentile, positive_int
from tests.clusterkit import Node
from tests.services import free_port
from tests.sitekit import Sender, Site, new_secret

REPO = Path(__file__).resolve().parent.parent
AP_JSON = "application/activity+json"
PUBLIC = "https://www.w3.org/ns/activitystreams#Public"
MARK = re.compile(rb"\[apb ([A-Za-z0-9_-]+)/(\d+)\]")
MARK_TEXT = re.compile(r"\[apb ([A-Za-z0-9_-]+)/(\d+)\]")
TEXT = ("Beste buren, het repair café van zaterdag gaat gewoon door in de bibliotheek. "
        "Neem kapotte lampen en kleding mee; koffie vanaf tien uur.")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the fake fediverse (its own process) ------------------------------------------------------------

class Fediverse:
    """H hosts on H ports; actors ``/users/<name>``, their inboxes, a shared ``/inbox`` per host."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.ports: list[int] = spec["ports"]
        self.actors: dict[int, dict[str, str]] = {}  # port -> name -> public key PEM
        for a in spec["actors"]:
            self.actors.setdefault(a["port"], {})[a["name"]] = a["public_pem"]
        self.group: str = spec["group"]
        self.delay: float = spec.get("delay", 0.0)
        self.group_key: sig.PublicKey | None = None
        self.key_lock = asyncio.Lock()
        self.deliveries: Counter[str] = Counter()        # tag -> POSTs accepted
        self.distinct: dict[str, set[tuple[int, int]]] = {}
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.accepts: set[str] = set()
        self.kinds: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()               # reason -> refused by the fake inboxes
        self.actor_gets = 0

    async def _group_key(self, session: aiohttp.ClientSession) -> sig.PublicKey:
        async with self.key_lock:
            if self.group_key is None:
                async with session.get(self.group, headers={"Accept": AP_JSON}) as r:
                    doc = await r.json(content_type=None)
                self.group_key = sig.load_public_key(doc["publicKey"]["publicKeyPem"])
            return self.group_key

    def app(self, port: int, session: aiohttp.ClientSession) -> Any:
        from aiohttp import web

        base = f"http://127.0.0.1:{port}"
        names = self.actors.get(port, {})

        async def actor(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            if name not in names:
                return web.json_response({"error": "no such actor"}, status=404)
            self.actor_gets += 1
            url = f"{base}/users/{name}"
            return web.Response(body=orjson.dumps({
                "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1"],
                "id": url, "type": "Person", "preferredUsername": name, "name": f"Bench {name}",
                "inbox": f"{url}/inbox", "outbox": f"{url}/outbox", "endpoints": {"sharedInbox": f"{base}/inbox"},
                "publicKey": {"id": f"{url}#main-key", "owner": url, "publicKeyPem": names[name]}}),
                content_type=AP_JSON)

        async def inbox(request: web.Request) -> web.Response:
            body = await request.read()
            key = await self._group_key(session)
            try:
                sig.verify_cavage(request.method, request.path_qs, request.headers, body, key, time.time())
            except sig.SignatureError as exc:
                self.bad[exc.reason] += 1
                return web.json_response({"error": str(exc)}, status=401)
            keyid = sig.key_id_of(request.headers)
            if not keyid or not keyid.startswith(self.group):
                self.bad["not_the_group"] += 1
                return web.json_response({"error": f"signed by {keyid}"}, status=401)
            if self.delay:
                await asyncio.sleep(self.delay)  # a server far away: the answer takes this long
            now = time.monotonic()
            doc = orjson.loads(body)
            self.kinds[str(doc.get("type"))] += 1
            if doc.get("type") == "Accept":
                self.accepts.add(str((doc.get("object") or {}).get("actor")))
                return web.Response(status=202)
            m = MARK.search(body)
            tag = m.group(1).decode() if m else "?"
            self.deliveries[tag] += 1
            self.distinct.setdefault(tag, set()).add((port, int(m.group(2)) if m else 0))
            self.first.setdefault(tag, now)
            self.last[tag] = now
            return web.Response(status=202)

        async def stats(request: web.Request) -> web.Response:
            return web.json_response({
                "deliveries": dict(self.deliveries), "distinct": {t: len(s) for t, s in self.distinct.items()},
                "first": self.first, "last": self.last, "accepts": sorted(self.accepts), "kinds": dict(self.kinds),
                "bad": dict(self.bad), "actor_gets": self.actor_gets})

        app = web.Application(client_max_size=2 * 1024 * 1024)
        app.router.add_get("/users/{name}", actor)
        app.router.add_post("/users/{name}/inbox", inbox)
        app.router.add_post("/inbox", inbox)
        app.router.add_get("/_stats", stats)
        return app

    async def serve(self) -> None:
        from aiohttp import web

        runners = []
        async with aiohttp.ClientSession() as session:
            for port in self.ports:
                runner = web.AppRunner(self.app(port, session), access_log=None)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", port).start()
                runners.append(runner)
            try:
                await asyncio.Event().wait()
            finally:
                for r in runners:
                    await r.cleanup()


def fediverse_main(spec_path: str) -> None:
    with contextlib.suppress(ImportError):
        import uvloop
        uvloop.install()
    spec = json.loads(Path(spec_path).read_text())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Fediverse(spec).serve())


# --- the benchmark -----------------------------------------------------------------------------------

@dataclass
class FakeActor:
    name: str
    port: int
    key: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/users/{self.name}"

    @property
    def key_id(self) -> str:
        return f"{self.url}#main-key"


@dataclass
class Phase:
    name: str
    items: int                      # activities posted (in) or messages posted (out)
    accepted: int = 0               # 202 from the gateway (in) / 2xx site posts (out)
    statuses: dict[str, int] = field(default_factory=dict)
    post_seconds: float = 0.0       # first post -> last answer
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    relay_seconds: float = 0.0      # first post -> the site has all (in)
    relayed: int = 0                # distinct at the site (in)
    site_dups: int = 0
    expected_deliveries: int = 0
    deliveries: int = 0             # POSTs accepted by the fake inboxes
    distinct_deliveries: int = 0    # distinct (host, seq)
    deliver_seconds: float = 0.0    # first post -> last delivery arrived
    gateway_cpu_accept: float = 0.0  # over first post -> last answer
    gateway_cpu: float = 0.0        # over the whole phase (until everything arrived)
    fediverse_cpu: float = 0.0
    bench_cpu: float = 0.0
    other_cpu: float = 0.0
    wall: float = 0.0
    sign_seconds: float = 0.0       # bench CPU to sign the requests beforehand (not in the timing)
    synapse_procs: int = 0

    @property
    def accept_rate(self) -> float:
        return self.accepted / self.post_seconds if self.post_seconds else 0.0

    @property
    def relay_rate(self) -> float:
        return self.relayed / self.relay_seconds if self.relay_seconds else 0.0

    @property
    def delivery_rate(self) -> float:
        return self.deliveries / self.deliver_seconds if self.deliver_seconds else 0.0


def synapse_processes() -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if any(a.startswith(b"synapse.app") or b"matrix_bench" in a for a in argv[:4]):
                n += 1  # Synapse (python -m synapse.app.homeserver) or the Matrix benchmark
    return n


def metric_lines(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            out[head] = float(value)
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.gw_port = free_port()
        self.base = f"http://127.0.0.1:{self.gw_port}"
        self.group = f"{self.base}/ap/groups/club"
        self.inbox = f"{self.group}/inbox"
        self.ports = [free_port() for _ in range(args.hosts)]
        self.actors: list[FakeActor] = []
        self.site = Site("site", new_secret(), prefix="s-")
        self.node: Node | None = None
        self.fedi: subprocess.Popen[bytes] | None = None
        self.http: aiohttp.ClientSession | None = None
        self.sender: Sender | None = None
        self.results: list[Phase] = []
        self._scan = 0
        self.site_seen: dict[str, Counter[int]] = {}

    # -- processes ------------------------------------------------------------------------------------
    async def start(self) -> None:
        t = time.monotonic()
        for i in range(self.args.actors):
            self.actors.append(FakeActor(f"a{i}", self.ports[i % len(self.ports)], sig.generate_rsa_key()))
        log(f"{len(self.actors)} RSA keys in {time.monotonic() - t:.1f} s")
        spec = {"ports": self.ports, "group": self.group, "delay": self.args.inbox_delay / 1000,
                "actors": [{"name": a.name, "port": a.port, "public_pem": sig.public_key_pem(a.key)}
                           for a in self.actors]}
        spec_path = self.workdir / "fediverse.json"
        spec_path.write_text(json.dumps(spec))
        with open(self.workdir / "fediverse.log", "ab") as logf:
            self.fedi = subprocess.Popen([sys.executable, "-m", "loadtests.ap_bench", "--fediverse", str(spec_path)],
                                         cwd=REPO, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        await self.site.start()
        text = (f'[gateway]\nlisten = "127.0.0.1:{self.gw_port}"\ndatabase = "{self.workdir}/gw.db"\n'
                f'log_format = "text"\nlog_level = "warning"\nretry_max_delay = 1.0\n'
                f'[platforms.fedi]\nkind = "activitypub"\nbase_url = "{self.base}"\nallow_private_addresses = true\n'
                f'[platforms.fedi.groups.club]\nname = "The Club"\n'
                + self.site.config(batch_max=20)
                + '[[links]]\nname = "l"\ngroups = [{platform = "fedi", group = "club"}, '
                  '{platform = "site", group = "g"}]\n')
        self.node = Node("gateway", text, self.gw_port, self.workdir)
        await self.node.start()
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(self.args.concurrency, 8)))
        self.sender = Sender(self.base, "site", self.site.secret)
        await self.until(self._fedi_up, 30, "the fake fediverse")
        log(f"gateway pid {self.node.proc.pid if self.node.proc else 0} on {self.base}; fake fediverse pid "
            f"{self.fedi.pid} on ports {self.ports}; site on {self.site.port}")

    async def stop(self) -> None:
        if self.sender:
            await self.sender.close()
        if self.http:
            await self.http.close()
        if self.node:
            self.node.stop()
        if self.fedi and self.fedi.poll() is None:
            self.fedi.terminate()
            try:
                self.fedi.wait(10)
            except subprocess.TimeoutExpired:
                self.fedi.kill()
                self.fedi.wait()
        await self.site.stop()

    async def _fedi_up(self) -> bool:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            return bool(await self.stats())
        return False

    async def stats(self) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get(f"http://127.0.0.1:{self.ports[0]}/_stats") as r:
            return await r.json()  # type: ignore[no-any-return]

    async def metrics(self) -> str:
        assert self.http is not None
        async with self.http.get(f"{self.base}/metrics") as r:
            return await r.text()

    def cpu(self) -> tuple[float, float, float, float]:
        assert self.node and self.node.proc and self.fedi
        return (cpu_seconds(self.node.proc.pid), cpu_seconds(self.fedi.pid), own_cpu_seconds(),
                machine_busy_seconds())

    async def until(self, check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str,
                    every: float = 0.02) -> float:
        deadline = time.monotonic() + timeout
        while True:
            v = check()
            if asyncio.iscoroutine(v):
                v = await v
            if v:
                return time.monotonic()
            if self.node is None or self.node.proc is None or self.node.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.node.tail() if self.node else ''}")
            if self.fedi is None or self.fedi.poll() is not None:
                raise RuntimeError("the fake fediverse exited: " + (self.workdir / "fediverse.log").read_text()[-2000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(every)

    def scan_site(self) -> None:
        events = self.site.events
        while self._scan < len(events):
            ev = events[self._scan].event
            self._scan += 1
            if ev.get("type") != "civic.message.created":
                continue
            m = MARK_TEXT.search(str((ev.get("data") or {}).get("text", "")))
            tag, seq = (m.group(1), int(m.group(2))) if m else ("?", 0)
            self.site_seen.setdefault(tag, Counter())[seq] += 1

    # -- signed requests ------------------------------------------------------------------------------
    def signed(self, actor: FakeActor, body: bytes, scheme: str) -> dict[str, str]:
        headers = {"Content-Type": AP_JSON}
        if scheme == "rfc9421":
            headers.update(sig.sign_rfc9421("POST", self.inbox, headers, body, actor.key_id, actor.key, time.time()))
        else:
            headers.update(sig.sign_cavage("POST", self.inbox, headers, body, actor.key_id, actor.key, time.time()))
        return headers

    def create(self, actor: FakeActor, tag: str, seq: int) -> bytes:
        note = f"{actor.url}/notes/{tag}-{seq}"
        return orjson.dumps({
            "@context": "https://www.w3.org/ns/activitystreams", "id": f"{note}/activity", "type": "Create",
            "actor": actor.url, "to": [PUBLIC, self.group], "cc": [f"{actor.url}/followers"],
            "published": "2026-11-27T22:00:00Z",
            "object": {"id": note, "type": "Note", "attributedTo": actor.url, "to": [PUBLIC, self.group],
                       "cc": [f"{actor.url}/followers"], "published": "2026-11-27T22:00:00Z",
                       "content": f"<p>[apb {tag}/{seq}] {TEXT}</p>"}})

    async def post_all(self, requests: list[tuple[bytes, dict[str, str]]]
                       ) -> tuple[float, float, Counter[int], list[float]]:
        """C senders take the next request; (first post, last answer, statuses, latencies in ms)."""
        assert self.http is not None
        statuses: Counter[int] = Counter()
        lat: list[float] = []
        it = iter(requests)
        last = 0.0

        async def worker() -> None:
            nonlocal last
            assert self.http is not None
            for body, headers in it:
                t = time.monotonic()
                try:
                    async with self.http.post(self.inbox, data=body, headers=headers) as r:
                        await r.read()
                        status = r.status
                except aiohttp.ClientError:
                    status = 0
                now = time.monotonic()
                lat.append((now - t) * 1000)
                statuses[status] += 1
                last = max(last, now)

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))
        return t0, last, statuses, lat

    def expected_fanout(self, authors: list[FakeActor]) -> int:
        """Inboxes an announce of each author's activity goes to: one shared inbox per host with a
        follower other than the author."""
        per_host = Counter(a.port for a in self.actors)
        return sum(sum(1 for p, n in per_host.items() if n - (1 if p == a.port else 0) > 0) for a in authors)

    # -- phases ---------------------------------------------------------------------------------------
    async def follow(self) -> None:
        reqs = []
        for a in self.actors:
            body = orjson.dumps({"@context": "https://www.w3.org/ns/activitystreams", "id": f"{a.url}/follows/club",
                                 "type": "Follow", "actor": a.url, "object": self.group})
            reqs.append((body, self.signed(a, body, "cavage")))
        t0, t1, statuses, _ = await self.post_all(reqs)
        if statuses != Counter({202: len(self.actors)}):
            raise RuntimeError(f"follows answered {dict(statuses)}")

        async def all_accepted() -> bool:
            return len((await self.stats())["accepts"]) >= len(self.actors)
        t2 = await self.until(all_accepted, 60, "the Accepts")
        log(f"{len(self.actors)} follows accepted (202) in {t1 - t0:.2f} s, every Accept at its inbox after "
            f"{t2 - t0:.2f} s")

    async def inbound(self, tag: str, scheme: str, n: int) -> Phase:
        ph = Phase(tag, n, synapse_procs=synapse_processes())
        authors = [self.actors[i % len(self.actors)] for i in range(n)]
        s0 = own_cpu_seconds()
        reqs = [(body, self.signed(a, body, scheme)) for i, a in enumerate(authors)
                for body in (self.create(a, tag, i),)]
        ph.sign_seconds = own_cpu_seconds() - s0
        ph.expected_deliveries = self.expected_fanout(authors)
        c0 = self.cpu()
        t0, t1, statuses, lat = await self.post_all(reqs)
        c1 = self.cpu()
        ph.statuses = {str(k): v for k, v in sorted(statuses.items())}
        ph.accepted = statuses.get(202, 0)
        ph.post_seconds = t1 - t0
        lat.sort()
        ph.p50_ms, ph.p99_ms = percentile(lat, 0.50), percentile(lat, 0.99)  # type: ignore[arg-type]
        ph.gateway_cpu_accept = c1[0] - c0[0]
        log(f"{tag}: {ph.accepted}/{n} accepted in {ph.post_seconds:.2f} s = {ph.accept_rate:.0f}/s, "
            f"p50 {ph.p50_ms:.1f} ms, p99 {ph.p99_ms:.1f} ms, statuses {ph.statuses}")

        def at_site() -> bool:
            self.scan_site()
            return len(self.site_seen.get(tag, ())) >= ph.accepted
        try:
            t2 = await self.until(at_site, self.args.timeout, f"{tag} at the site")
        except TimeoutError as exc:
            log(f"{tag}: {exc}; going on")
            t2 = time.monotonic()
        ph.relay_seconds = t2 - t0
        seen = self.site_seen.get(tag, Counter())
        ph.relayed = len(seen)
        log(f"{tag}: the site has all {ph.relayed} after {ph.relay_seconds:.2f} s = {ph.relay_rate:.0f}/s")
        await self._deliveries(ph, tag, t0, c0)
        self.scan_site()
        ph.site_dups = sum(v - 1 for v in self.site_seen.get(tag, Counter()).values())
        return ph

    async def _deliveries(self, ph: Phase, tag: str, t0: float, c0: tuple[float, ...]) -> None:
        last_count, last_change = -1, time.monotonic()
        st: dict[str, Any] = {}

        async def all_delivered() -> bool:
            nonlocal st, last_count, last_change
            st = await self.stats()
            got = st["deliveries"].get(tag, 0)
            if got != last_count:
                last_count, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > self.args.stall:
                log(f"{tag}: deliveries stalled at {got} of {ph.expected_deliveries} (nothing new for "
                    f"{self.args.stall:g} s); going on")
                return True
            return bool(got >= ph.expected_deliveries)
        await self.until(all_delivered, self.args.timeout, f"{tag} deliveries", every=0.05)
        c1 = self.cpu()
        ph.wall = time.monotonic() - t0
        await asyncio.sleep(0.5)  # anything more (duplicates) would show now
        st = await self.stats()
        ph.deliveries = st["deliveries"].get(tag, 0)
        ph.distinct_deliveries = st["distinct"].get(tag, 0)
        ph.deliver_seconds = st["last"][tag] - t0 if tag in st["last"] else 0.0
        ph.gateway_cpu, ph.fediverse_cpu, ph.bench_cpu = c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]
        ph.other_cpu = max(0.0, (c1[3] - c0[3]) - ph.gateway_cpu - ph.fediverse_cpu - ph.bench_cpu)
        log(f"{tag}: {ph.deliveries} deliveries ({ph.distinct_deliveries} distinct of {ph.expected_deliveries}) "
            f"after {ph.deliver_seconds:.2f} s = {ph.delivery_rate:.0f}/s; CPU s gateway {ph.gateway_cpu:.2f}, "
            f"fediverse {ph.fediverse_cpu:.2f}, bench {ph.bench_cpu:.2f}, other {ph.other_cpu:.2f}")

    async def outbound(self, tag: str, m: int) -> Phase:
        assert self.sender is not None
        ph = Phase(tag, m, synapse_procs=synapse_processes())
        ph.expected_deliveries = m * len({a.port for a in self.actors})
        batch, inflight = 10, 4
        seqs = iter(range(0, m, batch))
        statuses: Counter[int] = Counter()
        last = 0.0

        async def worker() -> None:
            nonlocal last
            assert self.sender is not None
            for start in seqs:
                events = [self.sender.event("civic.message.created", "g", {
                    "id": f"{tag}-{i}", "author": {"id": f"poster{i % 7}", "name": f"Poster {i % 7}",
                                                    "identity": "pseudonymous"},
                    "text": f"[apb {tag}/{i}] {TEXT}"}, event_id=f"ev-{tag}-{i}")
                    for i in range(start, min(m, start + batch))]
                status, body = await self.sender.send(events, batch=True)
                statuses[status] += len(events)
                last = max(last, time.monotonic())
                if not 200 <= status < 300:
                    raise RuntimeError(f"the gateway refused a site post: {status} {body}")

        c0 = self.cpu()
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        c1 = self.cpu()
        ph.statuses = {str(k): v for k, v in sorted(statuses.items())}
        ph.accepted = sum(v for k, v in statuses.items() if 200 <= k < 300)
        ph.post_seconds = last - t0
        ph.gateway_cpu_accept = c1[0] - c0[0]
        log(f"{tag}: the site posted {m} messages in {ph.post_seconds:.2f} s (batches of {batch}, {inflight} in "
            f"flight); expecting {ph.expected_deliveries} deliveries")
        await self._deliveries(ph, tag, t0, c0)
        return ph


def print_table(b: Bench, refused: dict[str, float], outcomes: dict[str, float]) -> bool:
    a = b.args
    print()
    print(f"ActivityPub benchmark: {a.actors} actors on {a.hosts} hosts, {a.concurrency} concurrent senders; "
          f"{a.activities} activities per inbound phase, {a.messages} site messages out"
          + (f"; the fake inboxes answer after {a.inbox_delay:g} ms" if a.inbox_delay else ""))
    head = (f"{'phase':11} {'items':>6} {'202':>6} {'in/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'relay s':>8} "
            f"{'relay/s':>7} {'deliveries':>10} {'dist.':>6} {'deliv s':>8} {'deliv/s':>7} "
            f"{'gw ms/item':>10} {'gw ms/dlv':>9} {'gw cores':>8} {'fedi':>5} {'bench':>5} {'other':>5}")
    print(head)
    print("-" * len(head))
    ok = True
    for p in b.results:
        inbound = p.name.startswith("in")
        n = max(1, p.accepted)
        d = max(1, p.deliveries)
        w = max(p.wall, 1e-9)
        print(f"{p.name:11} {p.items:6d} {p.accepted:6d} "
              f"{(f'{p.accept_rate:7.0f}' if inbound else '      -')} "
              f"{(f'{p.p50_ms:7.1f}' if inbound else '      -')} {(f'{p.p99_ms:7.1f}' if inbound else '      -')} "
              f"{(f'{p.relay_seconds:8.2f}' if inbound else '       -')} "
              f"{(f'{p.relay_rate:7.0f}' if inbound else '      -')} "
              f"{p.deliveries:10d} {p.distinct_deliveries:6d} {p.deliver_seconds:8.2f} {p.delivery_rate:7.0f} "
              f"{1000 * p.gateway_cpu / n:10.2f} "
              f"{(f'{1000 * p.gateway_cpu / d:9.2f}' if p.deliveries else '        -')} "
              f"{p.gateway_cpu / w:8.2f} "
              f"{p.fediverse_cpu / w:5.2f} {p.bench_cpu / w:5.2f} {p.other_cpu / w:5.2f}")
        lost = (p.items - p.accepted) + (p.accepted - p.relayed if inbound else 0) \
            + (p.expected_deliveries - p.distinct_deliveries)
        dups = p.site_dups + (p.deliveries - p.distinct_deliveries)
        if lost or dups:
            ok = False
            print(f"  {p.name}: NOT OK: {p.items - p.accepted} not accepted, "
                  f"{(p.accepted - p.relayed) if inbound else 0} not at the site, "
                  f"{p.expected_deliveries - p.distinct_deliveries} deliveries missing, {dups} duplicates")
    print()
    for p in b.results:
        if p.name.startswith("in"):
            print(f"{p.name}: gateway CPU {1000 * p.gateway_cpu_accept / max(1, p.accepted):.2f} ms per activity "
                  f"while accepting (first post -> last 202, {p.gateway_cpu_accept / max(p.post_seconds, 1e-9):.2f} "
                  f"cores), {1000 * p.gateway_cpu / max(1, p.accepted):.2f} ms "
                  f"per activity with its relay and its {p.deliveries} announces; signing them beforehand took the "
                  f"bench {1000 * p.sign_seconds / max(1, p.items):.2f} ms each"
                  + (f"; {p.synapse_procs} Synapse or Matrix-bench processes running" if p.synapse_procs else ""))
        else:
            print(f"{p.name}: site posts took {p.post_seconds:.2f} s (gateway CPU {p.gateway_cpu_accept:.2f} s); "
                  f"gateway CPU {1000 * p.gateway_cpu / max(1, p.deliveries):.2f} ms per delivery in all"
                  + (f"; {p.synapse_procs} Synapse or Matrix-bench processes running" if p.synapse_procs else ""))
    print(f"gateway refusals: {refused or 'none'}; deliveries by outcome: {outcomes}")
    if refused:
        ok = False
    if outcomes.get("dropped") or outcomes.get("expired"):
        ok = False
    return ok


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ap-bench-"))
    started = time.monotonic()
    ok = False
    bench = Bench(args, workdir)
    try:
        log(f"machine: {os.cpu_count()} cores; Synapse or Matrix-bench processes running: {synapse_processes()}")
        await bench.start()
        await bench.follow()
        # warm-up: one activity per actor (the actors' documents are cached from the follows already)
        warm = await bench.inbound("warm", "cavage", len(bench.actors))
        log(f"warm-up done ({warm.accepted} accepted)")
        bench.results.append(await bench.inbound("in-cavage", "cavage", args.activities))
        await asyncio.sleep(args.pause)
        if args.rfc9421:
            bench.results.append(await bench.inbound("in-rfc9421", "rfc9421", args.activities))
            await asyncio.sleep(args.pause)
        bench.results.append(await bench.outbound("out", args.messages))
        text = await bench.metrics()
        refused = {k.split('reason="')[1].split('"')[0]: v
                   for k, v in metric_lines(text, "civic_activitypub_refused_total").items() if v}
        outcomes = {k.split('outcome="')[1].split('"')[0]: v
                    for k, v in metric_lines(text, "civic_activitypub_deliveries_total").items()}
        received = sum(metric_lines(text, "civic_activitypub_received_total").values())
        st = await bench.stats()
        ok = print_table(bench, refused, outcomes)
        posted = len(bench.actors) * 2 + sum(p.items for p in bench.results if p.name.startswith("in"))
        log(f"the gateway counted {received:.0f} inbox requests that passed every check "
            f"(posted: {posted}, follows and warm-up included)")
        if received != posted:
            ok = False
        stray = {t: sum(c.values()) for t, c in bench.site_seen.items()
                 if t not in {p.name for p in bench.results} | {"warm"}}
        if stray:
            log(f"ODD: the site received messages of no inbound phase: {stray}")
        if st["bad"]:
            ok = False
            log(f"the fake inboxes refused: {st['bad']}")
        log(f"fake inboxes got, by type: {st['kinds']}; actor documents served: {st['actor_gets']}; "
            f"{time.monotonic() - started:.0f} s in all")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "phases": [
                {**asdict(p), "accept_rate": p.accept_rate, "relay_rate": p.relay_rate,
                 "delivery_rate": p.delivery_rate} for p in bench.results],
                "refused": refused, "outcomes": outcomes}, indent=1))
    finally:
        await bench.stop()
        if args.keep:
            log(f"kept {workdir} (gateway.log, fediverse.log, gw.db)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--fediverse":
        fediverse_main(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="400 activities, 100 messages")
    ap.add_argument("--activities", type=positive_int,
                    help="signed Creates per inbound phase (default 2000, quick 400)")
    ap.add_argument("--messages", type=positive_int, help="site messages out (default 500, quick 100)")
    ap.add_argument("--actors", type=positive_int, default=20, help="fediverse actors (default 20)")
    ap.add_argument("--hosts", type=positive_int, default=4, help="fake fediverse hosts (default 4)")
    ap.add_argument("--concurrency", type=positive_int, default=16, help="concurrent inbound senders (default 16)")
    ap.add_argument("--inbox-delay", type=float, default=0.0,
                    help="milliseconds the fake inboxes wait before answering (a distant server; default 0)")
    ap.add_argument("--no-rfc9421", dest="rfc9421", action="store_false", help="skip the RFC 9421 phase")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between phases (default 1)")
    ap.add_argument("--stall", type=float, default=30.0, help="give up when no delivery arrived for this long")
    ap.add_argument("--timeout", type=float, default=600.0, help="longest wait for a phase to drain")
    ap.add_argument("--json", help="also write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    args = ap.parse_args()
    args.activities = args.activities or (400 if args.quick else 2000)
    args.messages = args.messages or (100 if args.quick else 500)
    if args.hosts > args.actors:
        ap.error("--hosts must not exceed --actors")
    with contextlib.suppress(ImportError):
        import uvloop
        uvloop.install()
    try:
        sys.exit(asyncio.run(main_async(args)))
    except KeyboardInterrupt:
        print("interrupted; processes stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
