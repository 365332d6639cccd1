"""A receiving webhook site for load runs: verifies, decodes, records arrivals.

Used in-process by the benchmarks::

    sink = Sink({"b": key_b})
    await sink.start()            # sink.url("b") -> http://127.0.0.1:PORT/hooks/b
    ...
    ok = await sink.wait_for("single", 20000, timeout=30)
    rec = sink.phase("single")    # arrivals, latencies, duplicates
    await sink.stop()

``POST /hooks/{name}`` checks the Standard Webhooks signature with the key
given for ``name``, decodes a single CloudEvent or a batch by Content-Type with
the schema's decoders, records ``time.time_ns()`` for each event, and answers
200 ``{"ids": {}}``. A generator marks each event by putting
``[bench PHASE/SEQ/SEND_NS]`` in ``data.text`` (see :func:`marker`); the sink
keys arrivals by (phase, seq) and computes end-to-end latency as arrival time
minus SEND_NS, which needs no clock agreement beyond one machine's
``time.time_ns()``. This survives a relay that rewrites event and message ids.
Events without a marker are recorded by CloudEvent ``id`` in ``unmarked``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from adapters.webhook.signing import SignatureError, verify
from schemas.cloudevents import BATCH_CONTENT_TYPE, CONTENT_TYPE, batch_decoder, single_decoder

MARKER = re.compile(r"\[bench (\w+)/(\d+)/(\d+)\]")
_REPLY = b'{"ids": {}}'


def marker(phase: str, seq: int, send_ns: int) -> str:
    """The tag a generator puts in ``data.text`` so the sink can key and time the event."""
    return f"[bench {phase}/{seq}/{send_ns}]"


@dataclass
class PhaseRecord:
    """What arrived for one phase's marked events."""

    arrivals: dict[int, int] = field(default_factory=dict)  # seq -> arrival time_ns (first copy)
    latencies_ns: list[int] = field(default_factory=list)   # arrival - send, first copies only
    duplicates: int = 0
    first_ns: int | None = None
    last_ns: int | None = None


class Sink:
    """An aiohttp webhook receiver with counters; start()/stop() on the running loop."""

    def __init__(self, keys: dict[str, bytes], host: str = "127.0.0.1", port: int = 0) -> None:
        self.keys = keys
        self.host = host
        self.port = port
        self.phases: dict[str, PhaseRecord] = {}
        self.unmarked: dict[str, int] = {}  # CloudEvent id -> arrival time_ns
        self.unmarked_duplicates = 0
        self.requests = 0
        self.events = 0
        self.events_by_name: Counter[str] = Counter()
        self.batches = 0
        self.bad_signature = 0
        self.bad_body = 0
        self._runner: web.AppRunner | None = None

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/hooks/{name}"

    def phase(self, name: str) -> PhaseRecord:
        rec = self.phases.get(name)
        if rec is None:
            rec = self.phases[name] = PhaseRecord()
        return rec

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.add_routes([web.post("/hooks/{name}", self._handle)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, phase: str, count: int, timeout: float, stall: float = 5.0) -> bool:
        """Wait until ``count`` distinct events of ``phase`` arrived; False on timeout
        or when nothing new arrived for ``stall`` seconds."""
        rec = self.phase(phase)
        deadline = time.monotonic() + timeout
        seen, seen_at = -1, time.monotonic()
        while len(rec.arrivals) < count:
            now = time.monotonic()
            if len(rec.arrivals) != seen:
                seen, seen_at = len(rec.arrivals), now
            if now > deadline or now - seen_at > stall:
                return False
            await asyncio.sleep(0.005)
        return True

    async def _handle(self, request: web.Request) -> web.Response:
        key = self.keys.get(request.match_info["name"])
        if key is None:
            raise web.HTTPNotFound()
        body = await request.read()
        now_ns = time.time_ns()
        h = request.headers
        try:
            verify(key, h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature"),
                   body, now_ns / 1e9)
        except SignatureError as exc:
            self.bad_signature += 1
            raise web.HTTPUnauthorized(text=str(exc)) from None
        try:
            if request.content_type == CONTENT_TYPE:
                events = [single_decoder.decode(body)]
            elif request.content_type == BATCH_CONTENT_TYPE:
                events = batch_decoder.decode(body)
                self.batches += 1
            else:
                raise msgspec.DecodeError(f"unexpected content type {request.content_type!r}")
        except msgspec.DecodeError as exc:
            self.bad_body += 1
            raise web.HTTPBadRequest(text=str(exc)) from None
        self.requests += 1
        self.events += len(events)
        self.events_by_name[request.match_info["name"]] += len(events)
        for event in events:
            self._record(event, now_ns)
        return web.Response(status=200, body=_REPLY, content_type="application/json")

    def _record(self, event, now_ns: int) -> None:
        text = getattr(event.data, "text", None)
        m = MARKER.search(text) if text else None
        if m is None:
            if event.id in self.unmarked:
                self.unmarked_duplicates += 1
            else:
                self.unmarked[event.id] = now_ns
            return
        rec = self.phase(m.group(1))
        seq = int(m.group(2))
        if seq in rec.arrivals:
            rec.duplicates += 1
            return
        rec.arrivals[seq] = now_ns
        rec.latencies_ns.append(now_ns - int(m.group(3)))
        if rec.first_ns is None:
            rec.first_ns = now_ns
        rec.last_ns = now_ns
