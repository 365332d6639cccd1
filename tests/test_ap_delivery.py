"""adapters/activitypub/delivery.py: per-host queues, with a fake sender and clock."""

from __future__ import annotations

import asyncio

import msgspec

from adapters.activitypub import delivery as D
from gateway.adapter import MemoryState
from gateway.netguard import FetchError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def item(inbox: str, n: int, created: float = 1000.0) -> D.OutItem:
    return D.OutItem(inbox=inbox, body=f"body {n}".encode(), actor="https://gw/ap/groups/g", created=created)


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


async def test_hosts_are_independent_order_is_kept_and_failures_wait_their_turn() -> None:
    sent: list[tuple[str, bytes]] = []
    answers: dict[str, list[int]] = {"down.example": [503, 503], "up.example": []}

    async def post(i: D.OutItem) -> int:
        host = D.host_of(i.inbox)
        sent.append((host, i.body))
        queue = answers.get(host, [])
        return queue.pop(0) if queue else 202

    clock = Clock()
    state = MemoryState()
    q = D.HostQueues(state, post, clock=clock)
    await q.enqueue([item("https://down.example/inbox", 1), item("https://up.example/inbox", 2),
                     item("https://down.example/inbox", 3), item("https://up.example/inbox", 4)])
    await settle()
    assert [b for h, b in sent if h == "up.example"] == [b"body 2", b"body 4"]  # not held up by the other host
    assert [b for h, b in sent if h == "down.example"] == [b"body 1"]  # the second waits behind the first
    assert q.counts.delivered == 2 and q.counts.retried == 1
    stored = await state.scan(D.PREFIX)
    assert len(stored) == 2 and all(k.startswith("out:down.example:") for k, _ in stored)
    first = D._decode(stored[0][1])
    assert first.attempts == 1 and 16 <= first.next_try - clock.now <= 16.5  # 1**4 + 15 (+ up to 0.5)
    await q.close()

    # a new process (same store) resumes; the failed one goes first, then the one behind it
    clock.now = first.next_try + 1
    q2 = D.HostQueues(state, post, clock=clock)
    await q2.resume()
    await settle()
    assert [b for h, b in sent if h == "down.example"] == [b"body 1", b"body 1"]
    clock.now += 100
    q2._kick("down.example")
    await settle()
    assert [b for h, b in sent if h == "down.example"] == [b"body 1", b"body 1", b"body 1", b"body 3"]
    assert await state.scan(D.PREFIX) == []
    await q2.close()


async def test_unsalvageable_answers_are_dropped_and_old_items_expire() -> None:
    answers = {"gone.example": 410, "auth.example": 401, "refused.example": None}

    async def post(i: D.OutItem) -> int:
        status = answers[D.host_of(i.inbox)]
        if status is None:
            raise FetchError("the gateway may not connect to 10.0.0.1", transient=False)
        return status

    clock = Clock()
    state = MemoryState()
    q = D.HostQueues(state, post, clock=clock, retry_max_age=3600)
    await q.enqueue([item("https://gone.example/inbox", 1), item("https://refused.example/inbox", 2),
                     item("https://auth.example/inbox", 3, created=clock.now - 7200)])
    await settle()
    assert q.counts.dropped == 2  # 410, and an address refused before connecting
    assert q.counts.expired == 1  # 401 is retried, but this one is older than retry_max_age
    assert await state.scan(D.PREFIX) == []
    await q.close()


async def test_the_breaker_leaves_a_failing_host_alone() -> None:
    calls = 0

    async def post(i: D.OutItem) -> int:
        nonlocal calls
        calls += 1
        return 500

    clock = Clock()
    q = D.HostQueues(MemoryState(), post, clock=clock, retry_max_age=10 ** 12)
    await q.enqueue([item("https://flaky.example/inbox", 1)])
    await settle()
    for _ in range(100):
        if calls >= D.BREAKER_FAILURES:
            break
        clock.now += 10 ** 6  # the retry is due
        q._kick("flaky.example")
        await settle()
    failures, open_until = q._breaker["flaky.example"]
    assert failures == D.BREAKER_FAILURES and open_until == clock.now + D.BREAKER_COOL_DOWN

    # open: even a due item waits out the cool-down
    await q.state.put({k: D._encode(D.OutItem(**{**msgspec.structs.asdict(D._decode(v)), "next_try": 0.0}))
                       for k, v in await q.state.scan(D.PREFIX)})
    q._kick("flaky.example")
    await settle()
    assert calls == D.BREAKER_FAILURES
    clock.now += D.BREAKER_COOL_DOWN + 1
    q._kick("flaky.example")
    await settle()
    assert calls == D.BREAKER_FAILURES + 1
    await q.close()


def test_retry_schedule_spans_days() -> None:
    total = sum(D.retry_delay(n) for n in range(1, 17))
    assert 1.5 * 86400 < total < 4 * 86400


async def test_in_a_cluster_the_node_that_leads_a_host_delivers_what_another_queued() -> None:
    sent: list[str] = []

    async def post(i: D.OutItem) -> int:
        sent.append(i.body.decode())
        return 202

    state = MemoryState()  # the shared store
    a = D.HostQueues(state, post, leads=lambda key: False)
    b = D.HostQueues(state, post, leads=lambda key: key == "ap-out/far.example")
    await a.enqueue([item("https://far.example/inbox", 1)])
    await settle()
    assert sent == []  # node a does not lead that host
    watcher = asyncio.get_running_loop().create_task(b.watch(every=0.05))
    for _ in range(100):
        if sent:
            break
        await asyncio.sleep(0.02)
    assert sent == ["body 1"] and await state.scan(D.PREFIX) == []
    await a.close()
    await b.close()
    watcher.cancel()
