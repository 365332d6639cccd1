"""Relay benchmark: webhook site -> target -> webhook site, single events and batches.

    python -m loadtests.relay_bench [--target gateway|minimal|both] [--rounds N] [--duration S] [--quick]

For each target (the gateway, ``python -m gateway.cli run``, and/or the
non-durable reference ``python -m loadtests.minimal_relay``) it writes a TOML
config with two webhook platforms, ``a`` (this process sends as it) and ``b``
(that target's in-process sink), and 8 links ``{a, gN} <-> {b, gN}``; starts
every target as a separate process on a free 127.0.0.1 port (each with its own
temp dir, config and sink) and waits for ``GET /healthz`` on all of them before
measuring anything. Then, from this process (uvloop, keep-alive aiohttp
client, bounded concurrency), it warms every target up and runs the phases
interleaved:

  warm-up   a few hundred single events per target, not reported;
  single    N single signed CloudEvents as fast as possible;
  batch     batches of 100 events as fast as possible;
  rate      single events at a fixed 1,000/s for --duration seconds.

Each phase runs ``--rounds`` times on every target before the next phase
starts, and the order of the targets alternates per round (gateway, minimal;
minimal, gateway; ... -- ABBA), so a VM whose speed drifts over minutes affects
both targets alike. Each round of a phase has its own sink key (``single_r1``,
``single_r2``, ...). The figures reported are medians over the rounds, each
round's figure is printed as well, and the ratio is taken from the medians.

Throughput is distinct events received by the sink / (last arrival - first
send). Latency is sink arrival - send time (both ``time.time_ns()`` on this
machine; the send time travels in ``data.text``). CPU per message is that
target's utime+stime (``/proc/PID/stat``, its process tree) over that target's
phase only, divided by events relayed; peak RSS is ``VmHWM`` after the single
phase and at the end. Every event must arrive exactly once: lost and duplicate
counts are printed, and the exit status is 1 if any target failed, refused,
lost or duplicated.

Load generator, sinks and targets share this machine's cores, so absolute
figures say little: compare the gateway with the minimal relay of the same
run (the ratio column).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp

from adapters.webhook.signing import secret_key, sign
from loadtests.sink import Sink, marker
from schemas.cloudevents import BATCH_CONTENT_TYPE, CONTENT_TYPE, MessageCreated, encoder
from schemas.v1 import Actor, Message

REPO = Path(__file__).resolve().parent.parent
GROUPS = 8
BATCH_SIZE = 100
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = {
    "gateway": ["-m", "gateway.cli", "run", "--config"],
    "minimal": ["-m", "loadtests.minimal_relay", "--config"],
}


@dataclass(frozen=True)
class Settings:
    warmup: int = 1000          # single events before measuring
    single: int = 10000         # events in one round of the single-event phase
    batch: int = 100000         # events in one round of the batch phase (batches of BATCH_SIZE)
    duration: float = 10.0      # seconds of one round of the fixed-rate phase
    rounds: int = 2             # rounds of every phase on every target (ABBA order)
    rate: float = 1000.0        # events/s in the fixed-rate phase
    concurrency: int = 64       # requests in flight from the generator
    send_cap: float = 30.0      # a closed-loop phase stops sending after this many seconds
    drain_timeout: float = 20.0 # wait at most this long for the sink to receive everything
    stall: float = 5.0          # ... or until nothing new arrived for this long
    start_timeout: float = 30.0 # for /healthz after starting the target


QUICK = Settings(warmup=200, single=2000, batch=10000, duration=3.0, rounds=1, send_cap=8.0,
                 drain_timeout=8.0, stall=3.0, start_timeout=15.0)


# --- events ----------------------------------------------------------------

AUTHORS = (
    Actor(id="https://buurt.example.nl/u/marieke", name="Marieke de Vries", identity="identified"),
    Actor(id="https://buurt.example.nl/u/joost.b", name="Joost Bakker", identity="identified"),
    Actor(id="https://buurt.example.nl/u/fatima", name="Fatima el Amrani", identity="identified"),
)
TEXTS = (
    ("Beste buren, het repair café van zaterdag gaat gewoon door in de bibliotheek. "
     "Neem kapotte lampen en kleding mee; koffie vanaf tien uur.",
     "<p>Beste buren, het <strong>repair café</strong> van zaterdag gaat gewoon door in de "
     "bibliotheek.</p><p>Koffie vanaf tien uur.</p>"),
    ("Het verslag van de informatieavond over de nieuwe speeltuin staat op de website. "
     "Reacties graag voor vrijdag.",
     "<p>Het verslag van de informatieavond over de nieuwe speeltuin staat op "
     "<a href=\"https://buurt.example.nl/speeltuin\">de website</a>.</p>"),
    ("Dinsdag is er weer een inloopochtend voor mantelzorgers. Aanmelden is niet nodig, "
     "de ruimte is rolstoeltoegankelijk.",
     "<p>Dinsdag is er weer een <em>inloopochtend</em> voor mantelzorgers.</p>"
     "<ul><li>Aanmelden is niet nodig</li></ul>"),
)


def make_event(phase: str, seq: int, send_ns: int) -> MessageCreated:
    """A realistic civic.message.created (~600 bytes on the wire) carrying its benchmark marker."""
    text, html = TEXTS[seq % len(TEXTS)]
    return MessageCreated(
        specversion="1.0",
        id=f"evt-{phase}-{seq}",
        source="https://buurt.example.nl/forum",
        subject=f"g{seq % GROUPS}",
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(send_ns // 1_000_000_000)),
        datacontenttype="application/json",
        data=Message(id=f"post-{phase}-{seq}", author=AUTHORS[seq % len(AUTHORS)],
                     text=f"{marker(phase, seq, send_ns)} {text}", html=html, language="nl"),
    )


# --- the target process ----------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string of printable text is a TOML basic string


def write_config(path: Path, target: str, port: int, secrets: dict[str, str], sink: Sink) -> None:
    lines = ["[gateway]", f"listen = {toml_str(f'127.0.0.1:{port}')}"]
    if target == "gateway":
        lines += [f"database = {toml_str(str(path.parent / 'gateway.db'))}",
                  f"admin_token = {toml_str(base64.urlsafe_b64encode(os.urandom(24)).decode())}"]
    for name in ("a", "b"):
        lines += ["", f"[platforms.{name}]", 'kind = "webhook"', f"secret = {toml_str(secrets[name])}",
                  f"url = {toml_str(sink.url(name))}", f"batch_max = {BATCH_SIZE}"]
    for i in range(GROUPS):
        lines += ["", "[[links]]", f'name = "bench-g{i}"',
                  f'groups = [{{platform = "a", group = "g{i}"}}, {{platform = "b", group = "g{i}"}}]']
    path.write_text("\n".join(lines) + "\n")


def process_tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{tid}/children") as f:
                    pids += [int(c) for c in f.read().split()]
        i += 1
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its live descendants."""
    ticks = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    kb = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/status") as f:
                kb += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


def machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine spent busy (not idle, not iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4] - ticks[7]) / CLK_TCK  # minus idle, iowait, steal


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def log_tail(path: Path, n: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


async def wait_healthy(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode}:\n{log_tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 200 from /healthz within {timeout:.0f} s:\n{log_tail(log)}")
            await asyncio.sleep(0.1)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# --- the generator -----------------------------------------------------------

class TargetDied(RuntimeError):
    """The target process exited while the generator was sending."""


@dataclass
class Sender:
    """Posts signed CloudEvents to platform ``a`` of the target, as a patient site would: 408, 429,
    5xx and connection errors are retried (honouring Retry-After, capped at 1 s) up to 20 times."""

    url: str
    key: bytes
    session: aiohttp.ClientSession
    alive: Callable[[], bool]
    statuses: Counter = field(default_factory=Counter)
    retries: int = 0
    refused: int = 0          # events not accepted after retries
    accepted: dict[str, set[int]] = field(default_factory=dict)
    last_ok_ns: int = 0
    last_error: str = ""      # status and start of the body of the last non-2xx answer

    async def post(self, phase: str, events: list[MessageCreated], msg_id: str) -> None:
        if len(events) == 1:
            body, ctype = encoder.encode(events[0]), CONTENT_TYPE
        else:
            body, ctype = encoder.encode(events), BATCH_CONTENT_TYPE
        for attempt in range(20):
            ts = int(time.time())
            headers = {"content-type": ctype, "webhook-id": msg_id, "webhook-timestamp": str(ts),
                       "webhook-signature": sign(self.key, msg_id, ts, body)}
            try:
                async with self.session.post(self.url, data=body, headers=headers) as resp:
                    reply = await resp.read()
                    status, retry_after = resp.status, resp.headers.get("Retry-After", "")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                status, reply, retry_after = 0, repr(exc).encode(), ""
                if not self.alive():
                    raise TargetDied("the target exited during the run") from None
            self.statuses[status] += 1
            if not 200 <= status < 300:
                self.last_error = f"{status} {reply[:200].decode(errors='replace')}"
            else:
                self.last_ok_ns = time.time_ns()
                seqs = self.accepted.setdefault(phase, set())
                seqs.update(int(e.id.rpartition("-")[2]) for e in events)
                return
            if status not in (0, 408, 429) and status < 500:
                break
            self.retries += 1
            delay = min(0.02 * 2 ** attempt, 1.0)
            with contextlib.suppress(ValueError):
                delay = min(max(float(retry_after), 0.01), 1.0)
            await asyncio.sleep(delay)
        self.refused += len(events)


def percentile(sorted_values: list[int], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] if sorted_values else float("nan")


@dataclass
class PhaseResult:
    phase: str                # e.g. "single_r1": the phase and round, the sink's key
    sent: int
    accepted: int
    received: int
    lost: int
    duplicates: int
    seconds: float
    msgs_per_s: float
    ingest_per_s: float
    cpu_us_per_msg: float
    bench_cpu_us_per_msg: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    drained: bool
    rss_peak_mb: float        # the target's VmHWM at the end of the phase
    target_cores: float       # the target's CPU seconds per second of the phase
    bench_cores: float        # this process's (generator + sink) CPU seconds per second
    other_cores: float        # CPU used by other processes on the machine during the phase (noise)
    send_lag_p99_ms: float = float("nan")  # fixed-rate phase: how late sends started (generator lag)


async def measure(phase: str, pid: int, sender: Sender, sink: Sink, settings: Settings, send) -> PhaseResult:
    """Run ``send()`` (returns events sent), wait for the sink to drain, and compute the figures."""
    cpu0, own0, busy0 = cpu_seconds(pid), own_cpu_seconds(), machine_busy_seconds()
    first_ns = time.time_ns()
    sent = await send()
    accepted = sender.accepted.get(phase, set())
    drained = await sink.wait_for(phase, len(accepted), settings.drain_timeout, settings.stall)
    cpu1, own1, busy1 = cpu_seconds(pid), own_cpu_seconds(), machine_busy_seconds()
    wall = (time.time_ns() - first_ns) / 1e9
    rec = sink.phase(phase)
    received = len(rec.arrivals)
    lost = len(accepted - rec.arrivals.keys())
    lat = sorted(rec.latencies_ns)
    span = ((rec.last_ns or first_ns) - first_ns) / 1e9
    ingest_span = (sender.last_ok_ns - first_ns) / 1e9
    per = 1e6 / received if received else float("nan")
    return PhaseResult(
        phase=phase, sent=sent, accepted=len(accepted), received=received, lost=lost,
        duplicates=rec.duplicates, seconds=span,
        msgs_per_s=received / span if span > 0 else float("nan"),
        ingest_per_s=len(accepted) / ingest_span if ingest_span > 0 else float("nan"),
        cpu_us_per_msg=(cpu1 - cpu0) * per, bench_cpu_us_per_msg=(own1 - own0) * per,
        p50_ms=percentile(lat, 0.50) / 1e6, p99_ms=percentile(lat, 0.99) / 1e6,
        max_ms=(lat[-1] / 1e6) if lat else float("nan"), drained=drained, rss_peak_mb=peak_rss_mb(pid),
        target_cores=(cpu1 - cpu0) / wall, bench_cores=(own1 - own0) / wall,
        other_cores=max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (own1 - own0)) / wall)


def closed_loop(sender: Sender, phase: str, n_events: int, per_request: int, settings: Settings):
    """As fast as possible: ``concurrency`` workers share one sequence of requests."""
    async def send() -> int:
        starts = iter(range(0, n_events, per_request))
        deadline = time.monotonic() + settings.send_cap
        sent = 0

        async def worker() -> None:
            nonlocal sent
            for start in starts:
                if time.monotonic() > deadline:
                    return
                now = time.time_ns()
                events = [make_event(phase, seq, now) for seq in range(start, min(start + per_request, n_events))]
                sent += len(events)
                msg_id = events[0].id if len(events) == 1 else f"batch-{phase}-{start}"
                await sender.post(phase, events, msg_id)

        async with asyncio.TaskGroup() as tg:  # one failure (TargetDied) cancels the others
            for i in range(settings.concurrency):
                tg.create_task(worker(), name=f"send {phase} worker {i}")
        return sent
    return send


def fixed_rate(sender: Sender, phase: str, settings: Settings, lag_ms: list[float]):
    """Open loop: event i is due at start + i/rate; late sends are caught up, and their lag recorded."""
    async def send() -> int:
        loop = asyncio.get_running_loop()
        total = int(settings.rate * settings.duration)
        in_flight = asyncio.Semaphore(max(settings.concurrency, 256))
        t0 = loop.time()

        async def one(seq: int, due: float) -> None:
            async with in_flight:
                lag_ms.append((loop.time() - due) * 1e3)
                event = make_event(phase, seq, time.time_ns())
                await sender.post(phase, [event], event.id)

        # Tick every millisecond and start what is due: a sub-millisecond asyncio.sleep
        # rounds to a 0 ms timer under uvloop and would spin the generator.
        seq = 0
        async with asyncio.TaskGroup() as tg:  # one failure (TargetDied) cancels the rest
            while seq < total:
                now = loop.time()
                while seq < total and t0 + seq / settings.rate <= now:
                    tg.create_task(one(seq, t0 + seq / settings.rate), name=f"send {phase}/{seq}")
                    seq += 1
                await asyncio.sleep(0.001)
        return total
    return send


PHASES = ("single", "batch", "rate")


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # NaN is not a figure
    return statistics.median(values) if values else float("nan")


@dataclass
class TargetResult:
    target: str
    error: str | None = None
    rounds: dict[str, list[PhaseResult]] = field(default_factory=dict)  # phase -> its rounds, in order
    peak_rss_mb: float = float("nan")
    statuses: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    refused: int = 0
    last_error: str = ""
    echoes: int = 0
    bad_signature: int = 0
    bad_body: int = 0
    unmarked: int = 0
    event_bytes: int = 0
    rate_lag_p99_ms: float = float("nan")  # median over the rounds of the fixed-rate phase

    def all_phases(self) -> list[PhaseResult]:
        return [p for rounds in self.rounds.values() for p in rounds]

    @property
    def faulty(self) -> bool:
        return bool(self.error or self.refused or self.echoes or self.bad_signature or self.bad_body
                    or any(p.lost or p.duplicates for p in self.all_phases()))


class TargetRun:
    """One target process with its own temp dir, config, port, sink and client session, kept
    alive for the whole run so that its phases can be interleaved with the other target's."""

    def __init__(self, target: str, settings: Settings) -> None:
        self.target, self.settings = target, settings
        self.result = TargetResult(target)
        self.result.event_bytes = len(encoder.encode(make_event("single_r1", 0, time.time_ns())))
        self.secrets = {"a": new_secret(), "b": new_secret()}
        self.keys = {name: secret_key(s) for name, s in self.secrets.items()}
        self.sink = Sink(self.keys)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"relay-bench-{target}-"))
        self.log = self.tmp / "target.log"
        self.proc: subprocess.Popen | None = None
        self.session: aiohttp.ClientSession | None = None
        self.sender: Sender | None = None

    @property
    def ok(self) -> bool:
        return self.result.error is None

    def fail(self, exc: BaseException) -> None:
        """Record the failure and stop the target, so it does not disturb the other one."""
        while isinstance(exc, ExceptionGroup):
            exc = exc.exceptions[0]
        msg = str(exc) if isinstance(exc, RuntimeError) and type(exc) is RuntimeError else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TargetDied) or (self.proc is not None and self.proc.poll() is not None):
            status = self.proc.returncode if self.proc is not None else None
            tail = log_tail(self.log)
            msg += f" (exit status {status})" + (f"\n{tail}" if tail else "")
        self.result.error = msg
        print(f"  {self.target} FAILED: {msg}", flush=True)
        if self.proc is not None:
            stop_process(self.proc)

    async def start(self) -> None:
        try:
            await self.sink.start()
            port = free_port()
            cfg = self.tmp / "config.toml"
            write_config(cfg, self.target, port, self.secrets, self.sink)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
            with open(self.log, "wb") as logf:
                self.proc = subprocess.Popen([sys.executable, *TARGETS[self.target], str(cfg)], cwd=REPO, env=env,
                                             stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
            await wait_healthy(self.proc, port, self.settings.start_timeout, self.log)
            connector = aiohttp.TCPConnector(limit=max(self.settings.concurrency, 256), keepalive_timeout=60)
            self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))
            proc = self.proc
            self.sender = Sender(f"http://127.0.0.1:{port}/v1/platforms/a/events", self.keys["a"], self.session,
                                 alive=lambda: proc.poll() is None)
            print(f"  {self.target} started: pid {self.proc.pid}, port {port}", flush=True)
        except Exception as exc:
            self.fail(exc)

    async def warm_up(self) -> None:
        if not self.ok:
            return
        try:
            await measure("warm", self.proc.pid, self.sender, self.sink, self.settings,
                          closed_loop(self.sender, "warm", self.settings.warmup, 1, self.settings))
            if not self.sender.accepted.get("warm"):
                raise RuntimeError(f"nothing accepted in the warm-up; last answer: {self.sender.last_error}")
        except Exception as exc:
            self.fail(exc)

    async def run_phase(self, phase: str, rnd: int) -> PhaseResult | None:
        """One round of ``phase`` on this target; its sink key is e.g. ``single_r1``."""
        if not self.ok:
            return None
        s, name, lag = self.settings, f"{phase}_r{rnd}", []
        if phase == "single":
            send = closed_loop(self.sender, name, s.single, 1, s)
        elif phase == "batch":
            send = closed_loop(self.sender, name, s.batch, BATCH_SIZE, s)
        else:
            send = fixed_rate(self.sender, name, s, lag)
        try:
            r = await measure(name, self.proc.pid, self.sender, self.sink, s, send)
        except Exception as exc:
            self.fail(exc)
            return None
        if lag:
            lag.sort()
            r.send_lag_p99_ms = percentile(lag, 0.99)
        self.result.rounds.setdefault(phase, []).append(r)
        if self.proc.poll() is not None:
            self.fail(RuntimeError("exited during the run"))
        return r

    async def close(self) -> None:
        r = self.result
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    r.peak_rss_mb = peak_rss_mb(self.proc.pid)
                elif r.error is None:
                    r.error = f"exited with status {self.proc.returncode} during the run:\n{log_tail(self.log)}"
                stop_process(self.proc)
            if self.session is not None:
                await self.session.close()
            if self.sender is not None:
                r.statuses = {str(k): v for k, v in sorted(self.sender.statuses.items())}
                r.retries, r.refused, r.last_error = self.sender.retries, self.sender.refused, self.sender.last_error
            r.rate_lag_p99_ms = median([p.send_lag_p99_ms for p in r.rounds.get("rate", [])])
            r.echoes = self.sink.events_by_name["a"]
            r.bad_signature, r.bad_body = self.sink.bad_signature, self.sink.bad_body
            r.unmarked = len(self.sink.unmarked)
            await self.sink.stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --- reporting ---------------------------------------------------------------

def print_phase(target: str, p: PhaseResult) -> None:
    """One round of one phase on one target, printed as soon as it is measured."""
    print(f"  {p.phase:<9} {target:<8} {p.msgs_per_s:>9,.0f} msg/s over {p.seconds:.2f} s "
          f"(accepted {p.ingest_per_s:,.0f}/s); p50 {p.p50_ms:.2f} p99 {p.p99_ms:.2f} max {p.max_ms:.1f} ms; "
          f"sent {p.sent} accepted {p.accepted} received {p.received} lost {p.lost} dup {p.duplicates}"
          f"{'' if p.drained else ' (drain timed out)'}")
    print(f"  {'':<18} CPU: target {p.cpu_us_per_msg:.0f} µs/msg ({p.target_cores:.2f} cores), "
          f"generator+sinks {p.bench_cpu_us_per_msg:.0f} µs/msg ({p.bench_cores:.2f} cores), "
          f"other processes {p.other_cores:.2f} cores{' (noisy run)' if p.other_cores > 0.2 else ''}; "
          f"target peak RSS so far {p.rss_peak_mb:.0f} MB", flush=True)


def print_target(r: TargetResult) -> None:
    print(f"\n== {r.target} ==")
    if r.error:
        print(f"  FAILED: {r.error}")
    phases = r.all_phases()
    if phases:
        print(f"  {len(phases)} measured phase rounds: sent {sum(p.sent for p in phases)}, accepted "
              f"{sum(p.accepted for p in phases)}, received {sum(p.received for p in phases)}, lost "
              f"{sum(p.lost for p in phases)}, duplicate {sum(p.duplicates for p in phases)}; other processes "
              f"at most {max(p.other_cores for p in phases):.2f} cores in any of them")
        print(f"  event size {r.event_bytes} B; peak RSS {r.peak_rss_mb:.1f} MB; statuses {r.statuses}; "
              f"retries {r.retries}; refused {r.refused}; fixed-rate send lag p99 {r.rate_lag_p99_ms:.2f} ms")
        if r.last_error:
            print(f"  last non-2xx answer: {r.last_error}")
        if r.echoes or r.bad_signature or r.bad_body or r.unmarked:
            print(f"  PROBLEMS: echoed to a {r.echoes}, bad signature {r.bad_signature}, "
                  f"bad body {r.bad_body}, unmarked events {r.unmarked}")


# (label, phase, figure of one round, how rounds combine, format); phase None: whole-run figures
FIGURES = (
    ("single-event throughput (msg/s)", "single", lambda p: p.msgs_per_s, median, "{:,.0f}"),
    ("batch-of-100 throughput (msg/s)", "batch", lambda p: p.msgs_per_s, median, "{:,.0f}"),
    ("latency p50 at 1k/s (ms)", "rate", lambda p: p.p50_ms, median, "{:.2f}"),
    ("latency p99 at 1k/s (ms)", "rate", lambda p: p.p99_ms, median, "{:.2f}"),
    ("CPU per msg, single (µs)", "single", lambda p: p.cpu_us_per_msg, median, "{:.0f}"),
    ("CPU per msg, batch (µs)", "batch", lambda p: p.cpu_us_per_msg, median, "{:.0f}"),
    ("peak RSS after single phase (MB)", "single", lambda p: p.rss_peak_mb, max, "{:.1f}"),
)


def figure_values(r: TargetResult) -> dict[str, tuple[object, list[float]]]:
    """label -> (the reported value, the per-round values it came from)."""
    out: dict[str, tuple[object, list[float]]] = {}
    for label, phase, get, combine, _ in FIGURES:
        rounds = [get(p) for p in r.rounds.get(phase, [])]
        out[label] = (combine(rounds) if rounds else None, rounds)
    out["peak RSS at the end (MB)"] = (r.peak_rss_mb if r.rounds.get("rate") and r.peak_rss_mb == r.peak_rss_mb
                                       else None, [])
    phases = r.all_phases()
    out["lost / duplicate"] = ((sum(p.lost for p in phases), sum(p.duplicates for p in phases))
                               if phases else None, [])
    return out


FORMATS = {label: fmt for label, _, _, _, fmt in FIGURES} | {"peak RSS at the end (MB)": "{:.1f}",
                                                             "lost / duplicate": None}


def print_table(results: list[TargetResult], settings: Settings, seconds: float) -> None:
    names = [r.target for r in results]
    ratio = {"gateway", "minimal"} <= set(names)
    show_rounds = settings.rounds > 1
    header = (["figure", *names] + (["gateway/minimal"] if ratio else [])
              + ([f"{n} rounds" for n in names] if show_rounds else []))
    values = {r.target: figure_values(r) for r in results}
    rows = []
    for label, fmt in FORMATS.items():
        def cell(v: object) -> str:
            return "n/a" if v is None else f"{v[0]} / {v[1]}" if fmt is None else fmt.format(v)
        row = [label, *(cell(values[n][label][0]) for n in names)]
        if ratio:
            g, m = values["gateway"][label][0], values["minimal"][label][0]
            row.append(f"{g / m:.2f}" if fmt and g is not None and m else "")
        if show_rounds:
            row += [" ".join(fmt.format(v) for v in values[n][label][1]) if fmt else "" for n in names]
        rows.append(row)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    order = (("interleaved per phase, ABBA order" if settings.rounds > 1 else "interleaved per phase")
             if len(names) > 1 else "one target")
    print(f"\n{len(names)} target(s), {os.cpu_count()} cores; per round: single {settings.single}, batch "
          f"{settings.batch} events, {settings.rate:.0f}/s for {settings.duration:.0f} s; {settings.rounds} "
          f"round(s) ({order}), figures are medians over rounds; {settings.concurrency} in flight; "
          f"run time {seconds:.0f} s")
    for i, row in enumerate([header, *rows]):
        print("| " + " | ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                                for j, (c, w) in enumerate(zip(row, widths))) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


async def main_async(args: argparse.Namespace) -> int:
    # SIGINT/SIGTERM cancel the run, so the finally blocks stop the targets and remove temp files.
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    t0 = time.monotonic()
    settings = QUICK if args.quick else Settings()
    overrides = {k: v for k, v in (("duration", args.duration), ("concurrency", args.concurrency),
                                   ("rounds", args.rounds)) if v is not None}
    settings = Settings(**{**asdict(settings), **overrides})
    targets = ["gateway", "minimal"] if args.target == "both" else [args.target]
    runs: list[TargetRun] = []
    try:
        # Start every target before measuring anything; they stay up for the whole run.
        for target in targets:
            runs.append(TargetRun(target, settings))
            await runs[-1].start()
        for run in runs:
            await run.warm_up()
        # Each phase, round by round; the first target alternates per round (ABBA), so that
        # a VM whose speed drifts over minutes weighs on both targets alike.
        for phase in PHASES:
            for rnd in range(1, settings.rounds + 1):
                for run in (runs if rnd % 2 else runs[::-1]):
                    p = await run.run_phase(phase, rnd)
                    if p is not None:
                        print_phase(run.target, p)
    finally:
        for run in runs:
            await run.close()
    results = [run.result for run in runs]
    for r in results:
        print_target(r)
    print_table(results, settings, time.monotonic() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{**asdict(r), "figures": {k: v[0] for k, v in figure_values(r).items()}} for r in results],
            indent=2, default=str))
    return 1 if any(r.faulty for r in results) else 0


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.relay_bench",
                                     description="Relay benchmark: site -> target -> site.")
    parser.add_argument("--target", choices=["gateway", "minimal", "both"], default="both")
    parser.add_argument("--rounds", type=positive_int,
                        help="rounds of every phase on every target, ABBA order (default 2, quick 1)")
    parser.add_argument("--duration", type=float,
                        help="seconds of one round of the fixed-rate phase (default 10, quick 3)")
    parser.add_argument("--concurrency", type=int, help="requests in flight (default 64)")
    parser.add_argument("--quick", action="store_true", help="small counts, one round, under a minute")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    try:
        sys.exit(run(main_async(args)))
    except asyncio.CancelledError:
        print("interrupted; the targets were stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
