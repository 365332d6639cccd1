"""Stalled bodies: many connections send most of a big body, then stall (issue 11).

    python -m loadtests.stalled_bodies [--connections 500] [--body-size 1048576] [--after 30] [--unsigned]

Starts the gateway as a subprocess (``python -m gateway.cli run``) on a free
127.0.0.1 port with two webhook platforms, ``a`` (this process posts as it)
and ``b`` (an in-process sink), linked; waits for ``/healthz``. Then:

  idle      signed single events flow to ``a`` at ``--rate``/s on their own
            connections (they keep flowing to the end); after ``--warmup``
            seconds the gateway's RSS is its idle figure;
  attack    ``--connections`` connections each send the headers of a
            ``--body-size`` POST to ``a`` and ``--fraction`` of the body, then
            stall: they send nothing more and keep the socket open until the
            gateway closes it. By default their headers pass every check the
            headers alone allow (fresh timestamp, a signature of the right
            shape that cannot be checked without the body), the worst case;
            ``--unsigned`` sends none;
  after     ``--after`` seconds from the moment the last attacker stalled.

RSS is ``VmRSS`` of ``/proc/PID/status``, sampled every 50 ms; peak is the
highest sample (and ``VmHWM``). It prints idle, peak and after figures, what
the attackers were answered, the signed traffic's rate and failures before
and during the attack, and whether the targets hold: peak <= idle + 64 MiB,
after <= idle + 16 MiB, and the signed traffic kept flowing (no failed
request, and at least half the idle rate while the attack lasted). The exit
status is 1 if a target was missed or the gateway died.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from adapters.webhook.signing import secret_key, sign
from loadtests.relay_bench import (free_port, log_tail, make_event, new_secret, positive_int, stop_process,
                                   toml_str, wait_healthy)
from loadtests.sink import Sink
from schemas.cloudevents import CONTENT_TYPE, encoder

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
PEAK_MARGIN = 64 * MiB
AFTER_MARGIN = 16 * MiB


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name + ":")) * 1024


def write_config(path: Path, port: int, secrets: dict[str, str], sink: Sink, extra: list[str]) -> None:
    lines = ["[gateway]", f"listen = {toml_str(f'127.0.0.1:{port}')}",
             f"database = {toml_str(str(path.parent / 'gateway.db'))}", 'log_level = "warning"', *extra]
    for name in ("a", "b"):
        lines += ["", f"[platforms.{name}]", 'kind = "webhook"', f"secret = {toml_str(secrets[name])}",
                  f"url = {toml_str(sink.url(name))}", "batch_max = 100"]
    lines += ["", "[[links]]", 'name = "l"', 'groups = [{platform = "a", group = "g0"}, {platform = "b", group = "g0"}]']
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Samples:
    """(monotonic time, RSS bytes) every 50 ms."""

    points: list[tuple[float, int]] = field(default_factory=list)

    def between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.points if start <= t <= end]

    async def run(self, pid: int) -> None:
        while True:
            with contextlib.suppress(OSError, StopIteration):
                self.points.append((time.monotonic(), rss_bytes(pid)))
            await asyncio.sleep(0.05)


@dataclass
class Signed:
    """Signed single events at a fixed rate, each on a connection of its own pool."""

    url: str
    key: bytes
    rate: float
    results: list[tuple[float, str]] = field(default_factory=list)  # (monotonic send time, "202" or the failure)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=32)) as session:
            tasks: set[asyncio.Task[None]] = set()
            seq = 0
            start = time.monotonic()
            try:
                while True:
                    seq += 1
                    task = asyncio.create_task(self._one(session, seq))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    await asyncio.sleep(max(0.0, start + seq / self.rate - time.monotonic()))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, session: aiohttp.ClientSession, seq: int) -> None:
        sent = time.monotonic()
        body = encoder.encode(make_event("signed", seq, time.time_ns()))
        ts, wid = int(time.time()), f"msg_signed_{seq}"
        headers = {"Content-Type": CONTENT_TYPE, "webhook-id": wid, "webhook-timestamp": str(ts),
                   "webhook-signature": sign(self.key, wid, ts, body)}
        try:
            async with session.post(self.url, data=body, headers=headers) as resp:
                await resp.read()
                self.results.append((sent, str(resp.status)))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.results.append((sent, type(exc).__name__))

    def window(self, start: float, end: float) -> tuple[int, Counter[str]]:
        """Requests sent in [start, end): how many were accepted, and the failures by kind."""
        got = [r for t, r in self.results if start <= t < end]
        return sum(1 for r in got if r == "202"), Counter(r for r in got if r != "202")


async def attacker(port: int, body_size: int, fraction: float, headers: dict[str, str], stalled: asyncio.Event,
                   done_sending: list[float], answers: Counter[str], hold: float) -> None:
    """One connection: headers, ``fraction`` of the body, then nothing until the gateway closes it."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        answers[f"connect failed ({type(exc).__name__})"] += 1
        done_sending.append(time.monotonic())
        return
    head = [f"POST /v1/platforms/a/events HTTP/1.1", f"Host: 127.0.0.1:{port}",
            f"Content-Length: {body_size}"] + [f"{k}: {v}" for k, v in headers.items()]
    chunk = b"x" * 65536
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        left = int(body_size * fraction)
        while left > 0:
            writer.write(chunk[:left])
            left -= min(left, len(chunk))
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    done_sending.append(time.monotonic())
    await stalled.wait()  # everyone stalls from here on; wait for the gateway's answer or its close
    outcome = "still open"
    try:
        first = await asyncio.wait_for(reader.read(64), hold)
        outcome = first.split(b" ")[1].decode() if first.startswith(b"HTTP/") else "closed, no answer"
        while await asyncio.wait_for(reader.read(65536), hold):
            pass
    except asyncio.TimeoutError:
        pass
    except (ConnectionError, OSError):
        if outcome == "still open":
            outcome = "reset, no answer"
    finally:
        answers[outcome] += 1
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def main_async(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="stalled-bodies-"))
    secrets = {"a": new_secret(), "b": new_secret()}
    sink = Sink({"b": secret_key(secrets["b"])})
    await sink.start()
    port = free_port()
    config, log = tmp / "gateway.toml", tmp / "gateway.log"
    extra = []
    if args.body_timeout is not None:
        extra.append(f"body_timeout = {args.body_timeout}")
    if args.body_budget is not None:
        extra.append(f"body_budget = {args.body_budget}")
    write_config(config, port, secrets, sink, extra)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(config)], cwd=REPO,
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    samples, tasks = Samples(), []
    try:
        await wait_healthy(proc, port, 30.0, log)
        tasks.append(asyncio.create_task(samples.run(proc.pid)))
        signed = Signed(f"http://127.0.0.1:{port}/v1/platforms/a/events", secret_key(secrets["a"]), args.rate)
        tasks.append(asyncio.create_task(signed.run()))
        t0 = time.monotonic()
        await asyncio.sleep(args.warmup)
        idle = int(statistics.median(samples.between(time.monotonic() - 2, time.monotonic())))
        print(f"idle RSS            {idle / MiB:7.1f} MiB (signed events flowing at {args.rate:g}/s)")

        key = secret_key(secrets["a"])
        stalled, done_sending, answers = asyncio.Event(), [], Counter()
        attack_start = time.monotonic()

        def headers() -> dict[str, str]:
            if args.unsigned:
                return {"Content-Type": CONTENT_TYPE}
            wid = f"msg_attack_{os.urandom(6).hex()}"
            return {"Content-Type": CONTENT_TYPE, "webhook-id": wid, "webhook-timestamp": str(int(time.time())),
                    "webhook-signature": "v1," + base64.b64encode(os.urandom(32)).decode()}

        hold = args.after + 30
        attackers = [asyncio.create_task(attacker(port, args.body_size, args.fraction, headers(), stalled,
                                                  done_sending, answers, hold)) for _ in range(args.connections)]
        while len(done_sending) < args.connections:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with status {proc.returncode}:\n{log_tail(log)}")
            await asyncio.sleep(0.05)
        stall_start = time.monotonic()
        stalled.set()
        print(f"attack              {args.connections} connections, {args.fraction:.0%} of "
              f"{args.body_size / MiB:g} MiB each sent in {stall_start - attack_start:.1f} s, then stalled "
              f"({'no signature headers' if args.unsigned else 'signature headers that pass the header checks'})")
        await asyncio.sleep(args.after)
        after = int(statistics.median(samples.between(time.monotonic() - 1, time.monotonic())))
        during = samples.between(attack_start, time.monotonic())
        peak = max(during)
        hwm = rss_bytes(proc.pid, "VmHWM")
        end = time.monotonic()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*attackers, return_exceptions=True)

        print(f"peak RSS            {peak / MiB:7.1f} MiB (+{(peak - idle) / MiB:.1f}; VmHWM {hwm / MiB:.1f} MiB)")
        print(f"RSS {args.after:g} s after stall {after / MiB:7.1f} MiB (+{(after - idle) / MiB:.1f})")
        print(f"attackers answered  {dict(sorted(answers.items()))}")
        ok_idle, fail_idle = signed.window(t0, attack_start)
        ok_att, fail_att = signed.window(attack_start, end - 1)
        rate_idle = ok_idle / (attack_start - t0)
        rate_att = ok_att / (end - 1 - attack_start)
        ok_hot, fail_hot = signed.window(attack_start, stall_start + (args.body_timeout or 10.0))
        print(f"signed traffic      before: {rate_idle:.0f}/s accepted, failures {dict(fail_idle) or 0}; "
              f"during and after the attack: {rate_att:.0f}/s accepted, failures {dict(fail_att) or 0} "
              f"(until the deadline: {ok_hot} accepted, {sum(fail_hot.values())} failed)")
        targets = {
            "peak <= idle + 64 MiB": peak <= idle + PEAK_MARGIN,
            f"after {args.after:g} s <= idle + 16 MiB": after <= idle + AFTER_MARGIN,
            "signed traffic keeps flowing": not fail_att and rate_att >= rate_idle / 2 and ok_hot > 0,
        }
        for name, held in targets.items():
            print(f"  {'held  ' if held else 'MISSED'}  {name}")
        return 0 if all(targets.values()) else 1
    except RuntimeError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for task in tasks:
            task.cancel()
        stop_process(proc)
        await sink.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def fraction(text: str) -> float:
    f = float(text)
    if not 0 < f < 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return f


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.stalled_bodies",
                                     description="Many stalled request bodies while signed traffic flows.")
    parser.add_argument("--connections", type=positive_int, default=500, help="stalling connections (500)")
    parser.add_argument("--body-size", type=positive_int, default=MiB, help="declared body size in bytes (1 MiB)")
    parser.add_argument("--fraction", type=fraction, default=0.95, help="share of the body sent before stalling")
    parser.add_argument("--unsigned", action="store_true", help="attackers send no signature headers")
    parser.add_argument("--rate", type=float, default=50.0, help="signed events per second (50)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of signed traffic before the attack")
    parser.add_argument("--after", type=float, default=30.0, help="seconds after the stall to measure RSS again")
    parser.add_argument("--body-timeout", type=float, help="[gateway] body_timeout (default: the gateway's)")
    parser.add_argument("--body-budget", type=positive_int, help="[gateway] body_budget (default: the gateway's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, log)")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
