"""MQTT relay benchmark: MQTT site -> target -> MQTT site, single events and batches.

    python -m loadtests.mqtt_bench [--target gateway|minimal|both] [--content-mode structured|batch]
                                   [--rounds N] [--single N] [--batch N] [--duration S] [--quick]
                                   [--json PATH] [--profile PHASE:DIR]

For each target (the gateway, ``python -m gateway.cli run``, and/or a trivial
non-durable MQTT forwarder, ``python -m loadtests.mqtt_bench --role forwarder``)
it starts the run's own Mosquitto (``tests.services.Mosquitto``, a free port of
127.0.0.1, stopped by PID), writes a TOML config with two MQTT platforms ``a``
and ``b`` on that broker and 8 links ``{a, gN} <-> {b, gN}``, and starts the
target and a receiver as separate processes. ``--content-mode`` is what the
targets send to ``b``: one event per message (``structured``, the gateway's
default) or a CloudEvents batch per delivery (``batch``). The receiver (one
aiomqtt client, QoS 1, persistent session) subscribes to
``civic/v1/b/out/#`` and records arrivals;
it also watches ``civic/v1/a/out/#`` (echoes) and ``civic/v1/+/errors``
(refusals). The generator, in this process (uvloop, one aiomqtt client, QoS 1,
at most ``--concurrency`` messages awaiting their PUBACK), publishes
``civic.message.created`` CloudEvents (``loadtests.relay_bench.make_event``,
about 650 bytes, ``[bench PHASE/SEQ/SEND_NS]`` in ``data.text``) to
``civic/v1/a/in``:

  warm-up   a few hundred single events per target, not reported;
  single    one CloudEvent per MQTT message, as fast as the broker takes them;
  batch     structured batches of 100 (application/cloudevents-batch+json);
  rate      single events at a fixed 1,000/s for --duration seconds.

Phases are interleaved between the targets in ABBA order per round, as in
relay_bench. Throughput is distinct events received / (last arrival - first
send); latency is arrival - send (``time.time_ns()`` on this machine). CPU per
message is utime+stime from ``/proc/PID/stat`` of the target, its broker, the
receiver and this process (the generator) over the phase including the drain,
divided by the events received. Every event must arrive exactly once, nothing
may be refused or echoed: otherwise the exit status is 1. Figures and how to
read them: loadtests/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import aiomqtt
import msgspec
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt.connection import AckingClient
from adapters.mqtt.encode import out_topic, topic_level
from adapters.mqtt.outbound import PackedProperties
from loadtests.relay_bench import (
    BATCH_SIZE,
    GROUPS,
    cpu_seconds,
    free_port,
    log_tail,
    machine_busy_seconds,
    make_event,
    median,
    own_cpu_seconds,
    peak_rss_mb,
    percentile,
    stop_process,
    toml_str,
    wait_healthy,
)
from loadtests.sink import MARKER, PhaseRecord
from schemas.cloudevents import BATCH_CONTENT_TYPE, CONTENT_TYPE, batch_decoder, encoder, single_decoder

REPO = Path(__file__).resolve().parent.parent
PREFIX = "civic/v1"
NO_MATCHING_SUBSCRIBERS = 0x10
MODES = ("structured", "batch")  # what the targets send to b: one event per message, or a batch per delivery
FORWARD_PENDING = 10_000  # the minimal forwarder's publishes handed to paho and not yet acknowledged


@dataclass(frozen=True)
class Settings:
    warmup: int = 1000          # single events before measuring
    single: int = 10000         # events (= messages) in one round of the single-event phase
    batch: int = 100000         # events in one round of the batch phase (messages of BATCH_SIZE)
    duration: float = 10.0      # seconds of one round of the fixed-rate phase
    rounds: int = 2             # rounds of every phase on every target (ABBA order)
    rate: float = 1000.0        # events/s in the fixed-rate phase
    concurrency: int = 64       # QoS 1 messages awaiting their PUBACK at the generator
    send_cap: float = 30.0      # a closed-loop phase stops sending after this many seconds
    drain_timeout: float = 30.0 # wait at most this long for the receiver to get everything
    stall: float = 5.0          # ... or until nothing new arrived for this long
    start_timeout: float = 30.0 # for the target to come up (and subscribe)


QUICK = Settings(warmup=200, single=2000, batch=10000, duration=3.0, rounds=1, send_cap=8.0,
                 drain_timeout=10.0, stall=3.0, start_timeout=20.0)


def publish_props(content_type: str) -> Properties:
    return PackedProperties(content_type)  # Content Type and Payload Format Indicator 1, as the gateway sends


# --- the receiver (its own process: python -m loadtests.mqtt_bench --role receiver) ---------------

class _Data(msgspec.Struct):
    text: str = ""


class _Event(msgspec.Struct):
    """What the receiver reads of each CloudEvent (the rest is not decoded)."""
    id: str
    subject: str
    type: str
    data: _Data


_single = msgspec.json.Decoder(_Event)
_batch = msgspec.json.Decoder(list[_Event])
_data = msgspec.json.Decoder(_Data)


class DirectClient(AckingClient):
    """The gateway's MQTT client class (aiomqtt, with the adapter's faster
    paho paths), handing each paho message straight to ``handler`` (no aiomqtt
    ``Message``, no queue) and acknowledging it as soon as the handler
    returns: the receiver and the minimal forwarder should cost as little as
    the same stack allows."""

    def __init__(self, handler: Callable[[paho.MQTTMessage], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handler = handler

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.handler(message)
        if message.qos:
            client.ack(message.mid, message.qos)


class Receiver:
    """Records arrivals by (phase, seq) from the marker in ``data.text``."""

    def __init__(self) -> None:
        self.phases: dict[str, PhaseRecord] = {}
        self.out_prefix = f"{PREFIX}/b/out/"
        self.echo_prefix = f"{PREFIX}/a/out/"
        self.messages = 0
        self.batches = 0
        self.events = 0
        self.echoes = 0
        self.errors: list[str] = []
        self.error_count = 0
        self.bad_body = 0
        self.wrong_group = 0
        self.unmarked = 0

    def phase(self, name: str) -> PhaseRecord:
        rec = self.phases.get(name)
        if rec is None:
            rec = self.phases[name] = PhaseRecord()
        return rec

    def handle(self, msg: paho.MQTTMessage) -> None:
        now_ns = time.time_ns()
        topic = msg.topic
        self.messages += 1
        if not topic.startswith(self.out_prefix):
            if topic.startswith(self.echo_prefix):
                self.echoes += 1
            else:
                self.error_count += 1
                if len(self.errors) < 5:
                    self.errors.append(msg.payload[:300].decode(errors="replace"))
            return
        ctype = getattr(msg.properties, "ContentType", None)
        try:
            if ctype == BATCH_CONTENT_TYPE:
                events = _batch.decode(msg.payload)
                self.batches += 1
            elif ctype == "application/json":  # binary mode: the attributes are user properties
                attrs = dict(getattr(msg.properties, "UserProperty", None) or ())
                events = [_Event(attrs["id"], attrs["subject"], attrs["type"], _data.decode(msg.payload))]
            else:
                events = [_single.decode(msg.payload)]
        except (msgspec.DecodeError, KeyError):
            self.bad_body += 1
            return
        group = topic[len(self.out_prefix):]
        self.events += len(events)
        for event in events:
            if topic_level(event.subject) != group:
                self.wrong_group += 1
            m = MARKER.search(event.data.text)
            if m is None:
                self.unmarked += 1
                continue
            rec = self.phase(m.group(1))
            seq = int(m.group(2))
            if seq in rec.arrivals:
                rec.duplicates += 1
                continue
            rec.arrivals[seq] = now_ns
            rec.latencies_ns.append(now_ns - int(m.group(3)))
            if rec.first_ns is None:
                rec.first_ns = now_ns
            rec.last_ns = now_ns

    async def wait_for(self, phase: str, count: int, timeout: float, stall: float) -> bool:
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

    def summary(self, phase: str, drained: bool) -> dict[str, Any]:
        rec = self.phase(phase)
        lat = sorted(rec.latencies_ns)
        return {"phase": phase, "drained": drained, "seqs": sorted(rec.arrivals), "duplicates": rec.duplicates,
                "first_ns": rec.first_ns, "last_ns": rec.last_ns,
                "p50_ns": percentile(lat, 0.50), "p99_ns": percentile(lat, 0.99),
                "max_ns": lat[-1] if lat else float("nan")}

    def stats(self) -> dict[str, Any]:
        return {"messages": self.messages, "batches": self.batches, "events": self.events, "echoes": self.echoes,
                "errors": self.error_count, "error_samples": self.errors, "bad_body": self.bad_body,
                "wrong_group": self.wrong_group, "unmarked": self.unmarked}


async def receiver_main(port: int, client_id: str) -> None:
    rec = Receiver()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client = DirectClient(rec.handle, "127.0.0.1", port, identifier=client_id,
                          protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props,
                          keepalive=30, timeout=10)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async with client:
        for topic in (f"{PREFIX}/b/out/#", f"{PREFIX}/a/out/#", f"{PREFIX}/+/errors"):
            await client.subscribe(topic, qos=1)
        reply({"ready": True})
        while line := await reader.readline():
            cmd = json.loads(line)
            if client._disconnected.done():
                reply({"error": "the receiver lost its connection to the broker"})
                return
            if cmd["op"] == "wait":
                drained = await rec.wait_for(cmd["phase"], cmd["count"], cmd["timeout"], cmd["stall"])
                reply(rec.summary(cmd["phase"], drained))
            elif cmd["op"] == "stats":
                reply(rec.stats())
            else:
                return


# --- the minimal forwarder (its own process: python -m loadtests.mqtt_bench --role forwarder) -------

async def forwarder_main(config_path: str) -> None:
    """The broker path alone: take every message on ``{prefix}/{platform}/in``, decode and validate
    its events, re-address each to the linked groups and publish it at QoS 1 on
    ``{prefix}/{target}/out/{group}`` (one message per event, or one batch per target group of the
    message when ``content_mode = "batch"``). No store, no ids, no policy, acknowledged on arrival;
    what is not sent yet waits in memory (lost if the process stops), at most ``FORWARD_PENDING``
    messages handed to paho at a time (paho has 65,535 packet ids and drops what finds none free)."""
    with open(config_path, "rb") as f:
        cfg = tomllib.load(f)
    platforms = {n: p for n, p in cfg.get("platforms", {}).items() if p.get("kind") == "mqtt"}
    brokers = {p["broker"] for p in platforms.values()}
    if len(brokers) != 1:
        raise SystemExit("the forwarder takes one broker for every platform")
    host, _, port = brokers.pop().removeprefix("mqtt://").rpartition(":")
    routes: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for link in cfg.get("links", []):
        members = [(g["platform"], g["group"]) for g in link["groups"] if g["platform"] in platforms]
        for source in members:
            routes.setdefault(source, []).extend(dest for dest in members if dest != source)
    props = {CONTENT_TYPE: publish_props(CONTENT_TYPE), BATCH_CONTENT_TYPE: publish_props(BATCH_CONTENT_TYPE)}
    in_topics = {f"{PREFIX}/{name}/in": name for name in platforms}
    holder: dict[str, paho.Client] = {}
    backlog: deque[tuple[str, bytes, Properties]] = deque()
    scheduled = False

    def pump() -> None:
        nonlocal scheduled
        scheduled = False
        inner = holder["paho"]
        while backlog and len(inner._out_messages) < FORWARD_PENDING:
            topic, body, p = backlog.popleft()
            info = inner.publish(topic, body, qos=1, properties=p)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise SystemExit(f"the forwarder could not publish: {paho.error_string(info.rc)}")

    def schedule_pump() -> None:
        nonlocal scheduled
        if backlog and not scheduled:
            scheduled = True
            loop.call_soon(pump)

    def forward(msg: paho.MQTTMessage) -> None:
        platform = in_topics.get(msg.topic)
        if platform is None:
            return
        try:
            if getattr(msg.properties, "ContentType", None) == BATCH_CONTENT_TYPE:
                events = batch_decoder.decode(msg.payload)
            else:
                events = [single_decoder.decode(msg.payload)]
        except msgspec.DecodeError:
            return
        out: dict[tuple[str, str], list[Any]] = {}
        for event in events:
            for dest in routes.get((platform, event.subject), ()):
                out.setdefault(dest, []).append(msgspec.structs.replace(event, subject=dest[1]))
        for (name, group), evs in out.items():
            topic = out_topic(PREFIX, name, group)
            if platforms[name].get("content_mode", "structured") == "batch" and len(evs) > 1:
                backlog.append((topic, encoder.encode(evs), props[BATCH_CONTENT_TYPE]))
            else:
                backlog.extend((topic, encoder.encode(ev), props[CONTENT_TYPE]) for ev in evs)
        schedule_pump()

    loop = asyncio.get_running_loop()
    client = ForwarderClient(forward, schedule_pump, host, int(port), identifier=f"bench-forwarder-{os.getpid()}",
                             protocol=aiomqtt.ProtocolVersion.V5, clean_start=True, keepalive=30, timeout=10)
    holder["paho"] = client._client
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with client:
        for topic in in_topics:
            await client.subscribe(topic, qos=1)
        done = client._disconnected
        await asyncio.wait([loop.create_task(stop.wait()), done], return_when=asyncio.FIRST_COMPLETED)
        if done.done() and not stop.is_set():
            raise SystemExit(f"the forwarder lost its connection: {done.exception()!r}")


class ForwarderClient(DirectClient):
    """A ``DirectClient`` that calls ``acked`` after each PUBACK of its own publishes."""

    def __init__(self, handler: Callable[[paho.MQTTMessage], None], acked: Callable[[], None],
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(handler, *args, **kwargs)
        self.acked = acked

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        super()._on_publish(client, userdata, mid, reason_code, properties)
        self.acked()


# --- the generator (this process) ---------------------------------------------------------------

class Generator:
    """One aiomqtt client publishing at QoS 1 to ``civic/v1/a/in``. A message the broker drops
    because nobody has subscribed yet (PUBACK 0x10: the target is still starting) is published
    again after 0.1 s, up to ``start_timeout``; events of a message with a PUBACK below 0x80
    otherwise are accepted and must arrive."""

    def __init__(self, port: int, client_id: str, settings: Settings) -> None:
        self.settings = settings
        self.client = AckingClient("127.0.0.1", port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5,
                                   clean_start=True, keepalive=30, timeout=10)
        self.client._client.max_inflight_messages_set(max(1000, settings.concurrency))
        self.topic = f"{PREFIX}/a/in"
        self.props = {CONTENT_TYPE: publish_props(CONTENT_TYPE), BATCH_CONTENT_TYPE: publish_props(BATCH_CONTENT_TYPE)}
        self.accepted: dict[str, set[int]] = {}
        self.codes: Counter[int] = Counter()
        self.retries = 0
        self.refused = 0
        self.failed = 0
        self.last_error = ""
        self.last_ok_ns = 0
        self.outstanding = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def start(self) -> None:
        await self.client.__aenter__()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.__aexit__(None, None, None)

    def _publish(self, phase: str, start: int, count: int, body: bytes, ctype: str,
                 done: Callable[[], None] | None, attempt: int = 0) -> None:
        if attempt == 0:
            self.outstanding += 1
            self.idle.clear()
        try:
            fut = self.client.publish_nowait(self.topic, body, self.props[ctype])
        except (aiomqtt.MqttError, ValueError) as exc:
            self.failed += count
            self.last_error = f"publish: {exc}"
            self._finish(done)
            return
        fut.add_done_callback(partial(self._acked, phase, start, count, body, ctype, done, attempt))

    def _acked(self, phase: str, start: int, count: int, body: bytes, ctype: str, done: Callable[[], None] | None,
               attempt: int, fut: asyncio.Future[int]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.failed += count
            self.last_error = f"no PUBACK: {fut.exception() if not fut.cancelled() else 'cancelled'}"
            self._finish(done)
            return
        code = fut.result()
        self.codes[code] += 1
        if code == NO_MATCHING_SUBSCRIBERS and attempt < self.settings.start_timeout * 10:
            self.retries += 1
            asyncio.get_running_loop().call_later(0.1, self._publish, phase, start, count, body, ctype, done,
                                                  attempt + 1)
            return
        if code >= 0x80 or code == NO_MATCHING_SUBSCRIBERS:
            self.refused += count
            self.last_error = f"PUBACK reason code 0x{code:02x}"
        else:
            self.accepted.setdefault(phase, set()).update(range(start, start + count))
            self.last_ok_ns = time.time_ns()
        self._finish(done)

    def _finish(self, done: Callable[[], None] | None) -> None:
        self.outstanding -= 1
        if done is not None:
            done()
        if self.outstanding == 0:
            self.idle.set()

    def closed_loop(self, phase: str, n_events: int, per_message: int) -> Callable[[], Any]:
        """As fast as the broker acknowledges, at most ``concurrency`` messages awaiting a PUBACK."""
        async def send() -> int:
            slots = asyncio.Semaphore(self.settings.concurrency)
            deadline = time.monotonic() + self.settings.send_cap
            sent = 0
            for start in range(0, n_events, per_message):
                await slots.acquire()
                if time.monotonic() > deadline:
                    slots.release()
                    break
                now = time.time_ns()
                events = [make_event(phase, seq, now) for seq in range(start, min(start + per_message, n_events))]
                if per_message == 1:
                    body, ctype = encoder.encode(events[0]), CONTENT_TYPE
                else:
                    body, ctype = encoder.encode(events), BATCH_CONTENT_TYPE
                sent += len(events)
                self._publish(phase, start, len(events), body, ctype, slots.release)
            await self.idle.wait()
            return sent
        return send

    def fixed_rate(self, phase: str, lag_ms: list[float]) -> Callable[[], Any]:
        """Open loop: event i is due at start + i/rate (checked every millisecond)."""
        async def send() -> int:
            loop = asyncio.get_running_loop()
            s = self.settings
            total = int(s.rate * s.duration)
            seq, t0 = 0, loop.time()
            while seq < total:
                now = loop.time()
                while seq < total and t0 + seq / s.rate <= now:
                    lag_ms.append((now - (t0 + seq / s.rate)) * 1e3)
                    event = make_event(phase, seq, time.time_ns())
                    self._publish(phase, seq, 1, encoder.encode(event), CONTENT_TYPE, None)
                    seq += 1
                await asyncio.sleep(0.001)
            await self.idle.wait()
            return total
        return send


# --- processes -----------------------------------------------------------------------------------

def write_config(path: Path, target: str, broker_url: str, mode: str, http_port: int) -> None:
    lines = []
    if target == "gateway":
        lines += ["[gateway]", f"listen = {toml_str(f'127.0.0.1:{http_port}')}",
                  f"database = {toml_str(str(path.parent / 'gateway.db'))}", 'node = "bench"', ""]
    for name in ("a", "b"):
        lines += [f"[platforms.{name}]", 'kind = "mqtt"', f"broker = {toml_str(broker_url)}",
                  f"batch_max = {BATCH_SIZE}"]
        if mode != "structured":
            lines.append(f"content_mode = {toml_str(mode)}")
        lines.append("")
    for i in range(GROUPS):
        lines += ["[[links]]", f'name = "bench-g{i}"',
                  f'groups = [{{platform = "a", group = "g{i}"}}, {{platform = "b", group = "g{i}"}}]', ""]
    path.write_text("\n".join(lines))


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


class ReceiverProc:
    """The receiver process and its line protocol (JSON commands on stdin, replies on stdout)."""

    def __init__(self, port: int, client_id: str, log: Path) -> None:
        self.port, self.client_id, self.log = port, client_id, log
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float) -> None:
        with open(self.log, "wb") as logf:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtests.mqtt_bench", "--role", "receiver", "--port", str(self.port),
                "--client-id", self.client_id, cwd=REPO, env=child_env(), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=logf, limit=64 * 1024 * 1024)
        ready = await self._read(timeout)
        if not ready.get("ready"):
            raise RuntimeError(f"receiver did not start: {ready}")

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"no answer from the receiver within {timeout:.0f} s") from None
        if not line:
            raise RuntimeError(f"the receiver exited:\n{log_tail(self.log)}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    async def request(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._read(timeout)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self.request({"op": "quit"}, 0.1)
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class PhaseResult:
    phase: str
    sent: int
    accepted: int
    received: int
    lost: int
    duplicates: int
    seconds: float
    msgs_per_s: float
    publish_per_s: float     # rate at which the broker acknowledged the generator's events
    p50_ms: float
    p99_ms: float
    max_ms: float
    drained: bool
    target_us: float         # CPU µs per event received, the target process
    broker_us: float         # ... its Mosquitto
    generator_us: float      # ... this process (the generator)
    receiver_us: float       # ... the receiver process
    target_cores: float
    broker_cores: float
    generator_cores: float
    receiver_cores: float
    other_cores: float       # everything else on the machine (including the idle target, its broker...)
    rss_peak_mb: float
    send_lag_p99_ms: float = float("nan")


@dataclass
class TargetResult:
    target: str
    mode: str
    error: str | None = None
    rounds: dict[str, list[PhaseResult]] = field(default_factory=dict)
    peak_rss_mb: float = float("nan")
    codes: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    refused: int = 0
    failed: int = 0
    last_error: str = ""
    receiver: dict[str, Any] = field(default_factory=dict)

    def all_phases(self) -> list[PhaseResult]:
        return [p for rounds in self.rounds.values() for p in rounds]

    @property
    def problems(self) -> list[str]:
        r = self.receiver
        found = [f"{k} {r.get(k)}" for k in ("echoes", "errors", "bad_body", "wrong_group", "unmarked") if r.get(k)]
        if self.refused or self.failed:
            found.append(f"refused {self.refused} failed {self.failed} ({self.last_error})")
        return found

    @property
    def faulty(self) -> bool:
        return bool(self.error or self.problems or any(p.lost or p.duplicates for p in self.all_phases()))


TARGET_CMD = {
    "gateway": ["-m", "gateway.cli", "run", "--config"],
    "minimal": ["-m", "loadtests.mqtt_bench", "--role", "forwarder", "--config"],
}


class TargetRun:
    """One target with its own broker, receiver, config, generator client and temp dir."""

    def __init__(self, target: str, mode: str, settings: Settings, persistence: bool,
                 profile: tuple[str, Path] | None = None) -> None:
        from tests.services import Mosquitto  # the run's own broker, on a free port of 127.0.0.1

        self.target, self.mode, self.settings, self.profile = target, mode, settings, profile
        self.result = TargetResult(target, mode)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"mqtt-bench-{target}-"))
        self.broker = Mosquitto(self.tmp / "broker", persistence=persistence)
        # Room for a whole phase queued for a slow consumer (a silent drop would show as lost
        # events), and no Nagle delay on the broker's writes: without it, small messages wait for
        # the client's delayed ACK (the minimal forwarder's p50 at 1k/s was 6 ms, 0.3 ms with it).
        with open(self.broker.conf, "a") as f:
            f.write("max_queued_messages 1000000\nset_tcp_nodelay true\n")
        self.log = self.tmp / "target.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.receiver = ReceiverProc(self.broker.port, f"bench-receiver-{target}", self.tmp / "receiver.log")
        self.gen: Generator | None = None

    @property
    def ok(self) -> bool:
        return self.result.error is None

    def fail(self, exc: BaseException) -> None:
        msg = str(exc) if type(exc) is RuntimeError else f"{type(exc).__name__}: {exc}"
        if self.proc is not None and self.proc.poll() is not None:
            msg += f" (exit status {self.proc.returncode})\n{log_tail(self.log)}"
        self.result.error = msg
        print(f"  {self.target} FAILED: {msg}", flush=True)
        if self.proc is not None:
            stop_process(self.proc)

    async def start(self) -> None:
        try:
            self.broker.start()
            await self.receiver.start(self.settings.start_timeout)
            cfg = self.tmp / "config.toml"
            http_port = free_port()
            write_config(cfg, self.target, self.broker.url, self.mode, http_port)
            with open(self.log, "wb") as logf:
                self.proc = subprocess.Popen([sys.executable, *TARGET_CMD[self.target], str(cfg)], cwd=REPO,
                                             env=child_env(), stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=subprocess.STDOUT)
            if self.target == "gateway":
                await wait_healthy(self.proc, http_port, self.settings.start_timeout, self.log)
            self.gen = Generator(self.broker.port, f"bench-generator-{self.target}", self.settings)
            await self.gen.start()
            assert self.broker.proc is not None
            print(f"  {self.target} started: pid {self.proc.pid}, broker pid {self.broker.proc.pid} "
                  f"port {self.broker.port}, receiver pid {self.receiver.pid}", flush=True)
        except Exception as exc:
            self.fail(exc)

    async def measure(self, phase: str, send: Callable[[], Any]) -> PhaseResult:
        assert self.proc is not None and self.gen is not None and self.broker.proc is not None
        s = self.settings
        pids = (self.proc.pid, self.broker.proc.pid, self.receiver.pid)

        def snapshot() -> tuple[list[float], float, float]:
            return [cpu_seconds(p) for p in pids], own_cpu_seconds(), machine_busy_seconds()

        (c0, own0, busy0), first_ns = snapshot(), time.time_ns()
        sent = await send()
        accepted = self.gen.accepted.get(phase, set())
        if self.proc.poll() is not None:
            raise RuntimeError("the target exited during the phase")
        rec = await self.receiver.request({"op": "wait", "phase": phase, "count": len(accepted),
                                           "timeout": s.drain_timeout, "stall": s.stall}, s.drain_timeout + 30)
        c1, own1, busy1 = snapshot()
        wall = (time.time_ns() - first_ns) / 1e9
        received = len(rec["seqs"])
        per = 1e6 / received if received else float("nan")
        used = [b - a for a, b in zip(c0, c1)]
        span = ((rec["last_ns"] or first_ns) - first_ns) / 1e9
        publish_span = (self.gen.last_ok_ns - first_ns) / 1e9
        other = (busy1 - busy0) - sum(used) - (own1 - own0)
        return PhaseResult(
            phase=phase, sent=sent, accepted=len(accepted), received=received,
            lost=len(accepted - set(rec["seqs"])), duplicates=rec["duplicates"], seconds=span,
            msgs_per_s=received / span if span > 0 else float("nan"),
            publish_per_s=len(accepted) / publish_span if publish_span > 0 else float("nan"),
            p50_ms=rec["p50_ns"] / 1e6, p99_ms=rec["p99_ns"] / 1e6, max_ms=rec["max_ns"] / 1e6,
            drained=rec["drained"], target_us=used[0] * per, broker_us=used[1] * per,
            generator_us=(own1 - own0) * per, receiver_us=used[2] * per, target_cores=used[0] / wall,
            broker_cores=used[1] / wall, generator_cores=(own1 - own0) / wall, receiver_cores=used[2] / wall,
            other_cores=max(0.0, other) / wall, rss_peak_mb=peak_rss_mb(self.proc.pid))

    async def run_phase(self, phase: str, rnd: int) -> PhaseResult | None:
        if not self.ok:
            return None
        assert self.gen is not None
        s, name, lag = self.settings, f"{phase}_r{rnd}" if rnd else phase, []
        if phase in ("single", "warm"):
            send = self.gen.closed_loop(name, s.single if phase == "single" else s.warmup, 1)
        elif phase == "batch":
            send = self.gen.closed_loop(name, s.batch, BATCH_SIZE)
        else:
            send = self.gen.fixed_rate(name, lag)
        spy = self._py_spy(phase, name)
        try:
            r = await self.measure(name, send)
        except Exception as exc:
            self.fail(exc)
            return None
        finally:
            if spy is not None:  # py-spy writes its file when interrupted
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
        if lag:
            lag.sort()
            r.send_lag_p99_ms = percentile(lag, 0.99)
        if phase != "warm":
            self.result.rounds.setdefault(phase, []).append(r)
        return r

    def _py_spy(self, phase: str, name: str) -> subprocess.Popen[bytes] | None:
        """``--profile PHASE:DIR``: sample the target with py-spy during every round of PHASE."""
        if self.profile is None or self.profile[0] != phase or self.proc is None:
            return None
        out = self.profile[1] / f"{self.target}-{self.mode}-{name}.txt"
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        duration = int(self.settings.send_cap + self.settings.drain_timeout) + 5
        print(f"  profiling {self.target} during {name} into {out}", flush=True)
        return subprocess.Popen([spy, "record", "-p", str(self.proc.pid), "-r", "500", "-f", "raw", "-o", str(out),
                                 "-d", str(duration), "--nonblocking"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    async def close(self) -> None:
        r = self.result
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    r.peak_rss_mb = peak_rss_mb(self.proc.pid)
                elif r.error is None:
                    r.error = f"exited with status {self.proc.returncode} during the run:\n{log_tail(self.log)}"
            if self.receiver.proc is not None and self.receiver.proc.returncode is None:
                with contextlib.suppress(Exception):
                    r.receiver = await self.receiver.request({"op": "stats"}, 10)
            if self.gen is not None:
                r.codes = {f"0x{k:02x}": v for k, v in sorted(self.gen.codes.items())}
                r.retries, r.refused, r.failed = self.gen.retries, self.gen.refused, self.gen.failed
                r.last_error = self.gen.last_error
                await self.gen.close()
            if self.proc is not None:
                stop_process(self.proc)
            await self.receiver.stop()
            self.broker.stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --- reporting -----------------------------------------------------------------------------------

def print_phase(target: str, p: PhaseResult) -> None:
    print(f"  {p.phase:<9} {target:<8} {p.msgs_per_s:>9,.0f} msg/s over {p.seconds:.2f} s "
          f"(published {p.publish_per_s:,.0f}/s); p50 {p.p50_ms:.2f} p99 {p.p99_ms:.2f} max {p.max_ms:.1f} ms; "
          f"sent {p.sent} accepted {p.accepted} received {p.received} lost {p.lost} dup {p.duplicates}"
          f"{'' if p.drained else ' (drain timed out)'}")
    print(f"  {'':<18} CPU µs/msg (cores): target {p.target_us:.0f} ({p.target_cores:.2f}), broker "
          f"{p.broker_us:.0f} ({p.broker_cores:.2f}), generator {p.generator_us:.0f} ({p.generator_cores:.2f}), "
          f"receiver {p.receiver_us:.0f} ({p.receiver_cores:.2f}); other processes {p.other_cores:.2f} cores"
          f"{' (noisy run)' if p.other_cores > 0.2 else ''}; target peak RSS {p.rss_peak_mb:.0f} MB", flush=True)


FIGURES = (
    ("single-event throughput (msg/s)", "single", lambda p: p.msgs_per_s, median, "{:,.0f}"),
    ("batch-of-100 throughput (msg/s)", "batch", lambda p: p.msgs_per_s, median, "{:,.0f}"),
    ("latency p50 at 1k/s (ms)", "rate", lambda p: p.p50_ms, median, "{:.2f}"),
    ("latency p99 at 1k/s (ms)", "rate", lambda p: p.p99_ms, median, "{:.2f}"),
    ("CPU/msg single: target (µs)", "single", lambda p: p.target_us, median, "{:.0f}"),
    ("CPU/msg single: broker (µs)", "single", lambda p: p.broker_us, median, "{:.0f}"),
    ("CPU/msg single: generator (µs)", "single", lambda p: p.generator_us, median, "{:.0f}"),
    ("CPU/msg single: receiver (µs)", "single", lambda p: p.receiver_us, median, "{:.0f}"),
    ("CPU/msg batch: target (µs)", "batch", lambda p: p.target_us, median, "{:.0f}"),
    ("CPU/msg batch: broker (µs)", "batch", lambda p: p.broker_us, median, "{:.0f}"),
    ("CPU/msg batch: generator (µs)", "batch", lambda p: p.generator_us, median, "{:.0f}"),
    ("CPU/msg batch: receiver (µs)", "batch", lambda p: p.receiver_us, median, "{:.0f}"),
    ("CPU/msg at 1k/s: target (µs)", "rate", lambda p: p.target_us, median, "{:.0f}"),
    ("peak RSS after single phase (MB)", "single", lambda p: p.rss_peak_mb, max, "{:.1f}"),
)


def figure_values(r: TargetResult) -> dict[str, tuple[Any, list[float]]]:
    out: dict[str, tuple[Any, list[float]]] = {}
    for label, phase, get, combine, _ in FIGURES:
        rounds = [get(p) for p in r.rounds.get(phase, [])]
        out[label] = (combine(rounds) if rounds else None, rounds)
    out["peak RSS at the end (MB)"] = (r.peak_rss_mb if r.peak_rss_mb == r.peak_rss_mb else None, [])
    phases = r.all_phases()
    out["lost / duplicate"] = ((sum(p.lost for p in phases), sum(p.duplicates for p in phases))
                               if phases else None, [])
    return out


FORMATS = {label: fmt for label, _, _, _, fmt in FIGURES} | {"peak RSS at the end (MB)": "{:.1f}",
                                                             "lost / duplicate": None}


def print_target(r: TargetResult) -> None:
    print(f"\n== {r.target} (content_mode {r.mode}) ==")
    if r.error:
        print(f"  FAILED: {r.error}")
    phases = r.all_phases()
    if phases:
        print(f"  {len(phases)} measured phase rounds: sent {sum(p.sent for p in phases)}, accepted "
              f"{sum(p.accepted for p in phases)}, received {sum(p.received for p in phases)}, lost "
              f"{sum(p.lost for p in phases)}, duplicate {sum(p.duplicates for p in phases)}; other processes "
              f"at most {max(p.other_cores for p in phases):.2f} cores in any of them")
    print(f"  PUBACK codes {r.codes}; retries (0x10) {r.retries}; receiver {r.receiver}; "
          f"peak RSS {r.peak_rss_mb:.1f} MB")
    if r.problems:
        print(f"  PROBLEMS: {'; '.join(r.problems)}")


def print_table(results: list[TargetResult], settings: Settings, seconds: float) -> None:
    names = [r.target for r in results]
    ratio = {"gateway", "minimal"} <= set(names)
    show_rounds = settings.rounds > 1
    header = (["figure", *names] + (["gateway/minimal"] if ratio else [])
              + ([f"{n} rounds" for n in names] if show_rounds else []))
    values = {r.target: figure_values(r) for r in results}
    rows = []
    for label, fmt in FORMATS.items():
        def cell(v: Any) -> str:
            return "n/a" if v is None else f"{v[0]} / {v[1]}" if fmt is None else fmt.format(v)
        row = [label, *(cell(values[n][label][0]) for n in names)]
        if ratio:
            g, m = values["gateway"][label][0], values["minimal"][label][0]
            row.append(f"{g / m:.2f}" if fmt and g is not None and m else "")
        if show_rounds:
            row += [" ".join(fmt.format(v) for v in values[n][label][1]) if fmt else "" for n in names]
        rows.append(row)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print(f"\n{len(names)} target(s), {os.cpu_count()} cores, content_mode {results[0].mode if results else '?'}; "
          f"per round: single {settings.single}, batch {settings.batch} events, {settings.rate:.0f}/s for "
          f"{settings.duration:.0f} s; {settings.rounds} round(s), medians over rounds; {settings.concurrency} "
          f"messages in flight; run time {seconds:.0f} s")
    for i, row in enumerate([header, *rows]):
        print("| " + " | ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                                for j, (c, w) in enumerate(zip(row, widths))) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


PHASES = ("single", "batch", "rate")


async def main_async(args: argparse.Namespace) -> int:
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)  # the finally blocks stop what was started
    t0 = time.monotonic()
    settings = QUICK if args.quick else Settings()
    overrides = {k: v for k, v in (("duration", args.duration), ("concurrency", args.concurrency),
                                   ("rounds", args.rounds), ("single", args.single), ("batch", args.batch))
                 if v is not None}
    settings = Settings(**{**asdict(settings), **overrides})
    targets = ["gateway", "minimal"] if args.target == "both" else [args.target]
    profile = None
    if args.profile:
        phase, _, where = args.profile.partition(":")
        profile = (phase, Path(where or "."))
        profile[1].mkdir(parents=True, exist_ok=True)
    runs: list[TargetRun] = []
    try:
        for target in targets:
            runs.append(TargetRun(target, args.content_mode, settings, args.broker_persistence, profile))
            await runs[-1].start()
        for run in runs:
            p = await run.run_phase("warm", 0)
            if p is not None and not p.received:
                run.fail(RuntimeError(f"nothing arrived in the warm-up; last error: {run.gen.last_error}"))
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
    parser = argparse.ArgumentParser(prog="python -m loadtests.mqtt_bench",
                                     description="MQTT relay benchmark: MQTT site -> target -> MQTT site.")
    parser.add_argument("--target", choices=["gateway", "minimal", "both"], default="both")
    parser.add_argument("--content-mode", choices=MODES, default="structured",
                        help="what the targets send to b: one event per message (structured, the gateway's "
                             "default) or one CloudEvents batch per delivery (batch)")
    parser.add_argument("--rounds", type=positive_int, help="rounds of every phase on every target (default 2)")
    parser.add_argument("--single", type=positive_int, help="events in one round of the single phase (default 10000)")
    parser.add_argument("--batch", type=positive_int, help="events in one round of the batch phase (default 100000)")
    parser.add_argument("--duration", type=float, help="seconds of one round of the fixed-rate phase (default 10)")
    parser.add_argument("--concurrency", type=positive_int, help="messages awaiting a PUBACK (default 64)")
    parser.add_argument("--broker-persistence", action="store_true",
                        help="Mosquitto with persistence on (autosave every second); default off")
    parser.add_argument("--quick", action="store_true", help="small counts, one round")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--profile", metavar="PHASE:DIR",
                        help="record each target with py-spy (500 Hz, raw) during every round of PHASE "
                             "(single, batch or rate) into DIR/TARGET-MODE-PHASE_rN.txt")
    parser.add_argument("--role", choices=["bench", "receiver", "forwarder"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    if args.role == "receiver":
        run(receiver_main(args.port, args.client_id))
        return
    if args.role == "forwarder":
        run(forwarder_main(args.config))
        return
    try:
        sys.exit(run(main_async(args)))
    except asyncio.CancelledError:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
