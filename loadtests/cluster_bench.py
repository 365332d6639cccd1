"""Cluster benchmark: webhook site -> 1, 2 or 3 gateway nodes -> webhook site,
on one PostgreSQL (the store) and one Mosquitto (the bus).

    python -m loadtests.cluster_bench                 # 1, 2 and 3 nodes, ~3 minutes
    python -m loadtests.cluster_bench --nodes 1 3     # some sizes only
    python -m loadtests.cluster_bench --quick         # smaller counts

For each cluster size the run starts a fresh database (on the machine's
PostgreSQL, started if it is not running) and the benchmark's own Mosquitto on
a free port, starts the nodes as separate processes, waits until they share
all partitions, and then measures, like ``relay_bench``:

* single events and batches of 100 as fast as the nodes answer (the generator
  sends round-robin to the nodes, as a load balancer would), 64 requests in
  flight;
* messages/s received by the sink, CPU per message of all nodes together and of
  PostgreSQL and Mosquitto, and every node's share of the deliveries;

then prints a table with each size's figures and its ratio to one node.
Everything binds to 127.0.0.1, and the run stops what it started (by PID) and
drops its database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from adapters.webhook.signing import secret_key
from loadtests.relay_bench import (
    BATCH_SIZE,
    GROUPS,
    Sender,
    cpu_seconds,
    make_event,
    machine_busy_seconds,
    new_secret,
    own_cpu_seconds,
    toml_str,
)
from loadtests.sink import Sink
from tests.clusterkit import Node
from tests.services import Mosquitto, free_port, temp_database

PARTITIONS = 64


@dataclass
class Figures:
    nodes: int
    phase: str
    accepted: int
    received: int
    lost: int
    msgs_per_s: float
    node_cpu_us: float
    pg_cpu_us: float
    broker_cpu_us: float
    bench_cpu_us: float
    machine_cores: float
    shares: list[int] = field(default_factory=list)


def postgres_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "postgres"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def pids_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def node_config(port: int, node: str, dsn: str, bus: str, secrets: dict[str, str], sink: Sink) -> str:
    lines = ["[gateway]", f"listen = {toml_str(f'127.0.0.1:{port}')}", f"database = {toml_str(dsn)}",
             f"bus = {toml_str(bus)}", f"node = {toml_str(node)}", f"partitions = {PARTITIONS}"]
    for name in ("a", "b"):
        lines += ["", f"[platforms.{name}]", 'kind = "webhook"', f"secret = {toml_str(secrets[name])}",
                  f"url = {toml_str(sink.url(name))}", f"batch_max = {BATCH_SIZE}"]
    for i in range(GROUPS):
        lines += ["", "[[links]]", f'name = "bench-g{i}"',
                  f'groups = [{{platform = "a", group = "g{i}"}}, {{platform = "b", group = "g{i}"}}]']
    return "\n".join(lines) + "\n"


async def run_size(n_nodes: int, single: int, batch: int, concurrency: int, workdir: Path) -> list[Figures]:
    secrets = {"a": new_secret(), "b": new_secret()}
    sink = Sink({k: secret_key(v) for k, v in secrets.items()})
    await sink.start()
    results = []
    with temp_database() as dsn, Mosquitto(workdir / f"mosquitto-{n_nodes}", persistence=False) as mosq:
        nodes = []
        for i in range(1, n_nodes + 1):
            port = free_port()
            nodes.append(Node(f"n{i}", node_config(port, f"n{i}", dsn, mosq.url, secrets, sink), port, workdir))
        try:
            for n in nodes:
                await n.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                owned = [len((await n.readyz())["cluster"]["owned"]) for n in nodes]
                if sum(owned) == PARTITIONS and all(owned):
                    break
                await asyncio.sleep(0.3)
            else:
                raise RuntimeError(f"partitions not shared among {n_nodes} nodes: {owned}")
            async with aiohttp.ClientSession() as session:
                senders = [Sender(f"{n.url}/v1/platforms/a/events", secret_key(secrets["a"]), session,
                                  alive=lambda n=n: n.alive) for n in nodes]
                for phase, total, per in (("warmup", 1000, 1), ("single", single, 1), ("batch", batch, BATCH_SIZE)):
                    fig = await measure(phase, total, per, concurrency, nodes, senders, sink, mosq, n_nodes)
                    if phase != "warmup":
                        results.append(fig)
                        print_line(fig)
        finally:
            for n in nodes:
                n.stop()
            await sink.stop()
    return results


async def measure(phase: str, total: int, per: int, concurrency: int, nodes: list[Node], senders: list[Sender],
                  sink: Sink, mosq: Mosquitto, n_nodes: int) -> Figures:
    pg, broker = postgres_pids(), [mosq.proc.pid] if mosq.proc else []
    before_out = [await n.metric("civic_events_out_total") for n in nodes]
    cpu_nodes0, cpu_pg0, cpu_b0 = pids_cpu([n.proc.pid for n in nodes]), pids_cpu(pg), pids_cpu(broker)
    own0, busy0 = own_cpu_seconds(), machine_busy_seconds()
    t0 = time.time_ns()
    starts = iter(range(0, total, per))
    rr = itertools.count()

    async def worker() -> None:
        for start in starts:
            now = time.time_ns()
            events = [make_event(phase, seq, now) for seq in range(start, min(start + per, total))]
            sender = senders[next(rr) % len(senders)]
            await sender.post(phase, events, events[0].id if per == 1 else f"batch-{phase}-{start}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    accepted = set().union(*(s.accepted.get(phase, set()) for s in senders))
    await sink.wait_for(phase, len(accepted), timeout=120, stall=15)
    wall = (time.time_ns() - t0) / 1e9
    rec = sink.phase(phase)
    received = len(rec.arrivals)
    span = ((rec.last_ns or t0) - t0) / 1e9
    per_msg = 1e6 / received if received else float("nan")
    after_out = [await n.metric("civic_events_out_total") for n in nodes]
    return Figures(
        nodes=n_nodes, phase=phase, accepted=len(accepted), received=received,
        lost=len(accepted - rec.arrivals.keys()), msgs_per_s=received / span if span > 0 else float("nan"),
        node_cpu_us=(pids_cpu([n.proc.pid for n in nodes]) - cpu_nodes0) * per_msg,
        pg_cpu_us=(pids_cpu(pg) - cpu_pg0) * per_msg, broker_cpu_us=(pids_cpu(broker) - cpu_b0) * per_msg,
        bench_cpu_us=(own_cpu_seconds() - own0) * per_msg,
        machine_cores=(machine_busy_seconds() - busy0) / wall,
        shares=[int(a - b) for a, b in zip(after_out, before_out)])


def print_line(f: Figures) -> None:
    print(f"  {f.nodes} node(s) {f.phase:6} {f.msgs_per_s:9,.0f} msg/s; accepted {f.accepted} received {f.received} "
          f"lost {f.lost}; CPU per msg: nodes {f.node_cpu_us:.0f} µs, PostgreSQL {f.pg_cpu_us:.0f} µs, "
          f"broker {f.broker_cpu_us:.0f} µs, generator+sink {f.bench_cpu_us:.0f} µs; machine busy "
          f"{f.machine_cores:.2f} of {os.cpu_count()} cores; deliveries per node {f.shares}", flush=True)


def print_table(results: list[Figures]) -> None:
    base = {f.phase: f.msgs_per_s for f in results if f.nodes == min(r.nodes for r in results)}
    print("\n| nodes | phase | msg/s | ratio to the smallest | CPU µs/msg: nodes / PostgreSQL / broker "
          "| deliveries per node | lost |")
    print("|---|---|---|---|---|---|---|")
    for f in results:
        print(f"| {f.nodes} | {f.phase} | {f.msgs_per_s:,.0f} | {f.msgs_per_s / base[f.phase]:.2f} | "
              f"{f.node_cpu_us:.0f} / {f.pg_cpu_us:.0f} / {f.broker_cpu_us:.0f} | {f.shares} | {f.lost} |")


async def main_async(args: argparse.Namespace) -> int:
    single, batch = (2000, 20000) if args.quick else (args.single, args.batch)
    results: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        for n in args.nodes:
            print(f"== {n} node(s) ==", flush=True)
            results += await run_size(n, single, batch, args.concurrency, Path(tmp))
    print_table(results)
    return 1 if any(f.lost for f in results) else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.cluster_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--single", type=int, default=10000, help="single events per size (default 10000)")
    parser.add_argument("--batch", type=int, default=100000, help="events in batches of 100 per size (default 100000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2,000 single and 20,000 batched events per size")
    args = parser.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(run(main_async(args)))


if __name__ == "__main__":
    main()
