"""Retry schedules as data: when the delivery engine tries a failed delivery again.

Every adapter declares its schedule as a class constant (``Adapter.RETRY``,
read through ``Adapter.retry_schedule``), next to its ``Capabilities``; the
delivery engine (``gateway.delivery``) uses the target adapter's schedule for
every queue of that platform. A schedule is either exponential (``base``
doubled by ``factor`` each attempt) or an explicit list of ``steps`` (e.g.
Mastodon's), capped by ``max_delay`` and spread by ``jitter``; a delivery is
given up (dead-lettered) once its event is older than ``give_up_after``, or
after ``max_attempts``. Where a schedule leaves ``max_delay`` or
``give_up_after`` unset (None), the gateway's ``retry_max_delay`` and
``retry_max_age`` settings apply.

``permanent`` says which HTTP answers an adapter should report as permanent
(``PermanentDeliveryError``: straight to the dead letters) rather than
transient: 4xx other than ``retried_4xx``.

The schedules, as documented in docs/operations.md ("Retry schedules"):
``DEFAULT`` (webhook, MQTT, Matrix) and ``MASTODON`` (ActivityPub).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from msgspec import Struct

RETRY_AFTER_MAX = 3600.0
"""Longest ``Retry-After`` honoured, in seconds (a target asking for more gets this)."""


class RetrySchedule(Struct, frozen=True, kw_only=True):
    """When to try a failed delivery again, and when to give it up."""

    base: float = 0.5
    """Seconds before the first retry (exponential schedules)."""
    factor: float = 2.0
    """Each further retry waits this many times longer (exponential schedules)."""
    steps: tuple[float, ...] = ()
    """An explicit schedule instead: seconds before retry 1, 2, ...; past the
    end, the last step repeats."""
    max_delay: float | None = None
    """Longest wait between two attempts (None: the gateway's ``retry_max_delay``)."""
    jitter: tuple[float, float] = (0.5, 1.0)
    """The wait is multiplied by a random factor in this range, so that many
    queues failing together do not retry together."""
    give_up_after: float | None = None
    """Seconds after the event was queued when a failing delivery is given up
    (None: the gateway's ``retry_max_age``)."""
    max_attempts: int | None = None
    """Give up after this many failed attempts, whatever the age (None: no limit)."""
    retried_4xx: frozenset[int] = frozenset({408, 429})
    """HTTP 4xx answers that are worth retrying; every other 4xx is permanent."""

    def __post_init__(self) -> None:
        lo, hi = self.jitter
        if not (0 < self.base and 1 <= self.factor and 0 < lo <= hi and all(s >= 0 for s in self.steps)):
            raise ValueError(f"not a usable retry schedule: {self!r}")

    def delay(self, attempts: int, retry_after: float | None = None, *, max_delay: float,
              rand: Callable[[float, float], float] = random.uniform) -> float:
        """Seconds to wait after ``attempts`` failed attempts (1 after the first
        failure) before the next; ``retry_after`` (what the target asked for,
        up to ``RETRY_AFTER_MAX``) is a floor. ``max_delay`` is the gateway's
        setting, used where the schedule sets none."""
        n = max(1, attempts)
        if self.steps:
            raw = self.steps[min(n, len(self.steps)) - 1]
        else:
            raw = self.base * self.factor ** min(n - 1, 64)  # 2**64 half-seconds: past any cap
        cap = self.max_delay if self.max_delay is not None else max_delay
        wait = min(cap, raw) * rand(*self.jitter)
        if retry_after is not None:
            wait = max(wait, min(retry_after, RETRY_AFTER_MAX))
        return wait

    def gives_up(self, attempts: int, age: float, *, max_age: float) -> bool:
        """Whether a delivery that failed ``attempts`` times, whose event was
        queued ``age`` seconds ago, is given up. ``max_age`` is the gateway's
        ``retry_max_age``, used where the schedule sets no ``give_up_after``."""
        limit = self.give_up_after if self.give_up_after is not None else max_age
        return age > limit or (self.max_attempts is not None and attempts >= self.max_attempts)

    def permanent(self, status: int) -> bool:
        """Whether an HTTP answer means retrying cannot help (4xx but ``retried_4xx``)."""
        return 400 <= status < 500 and status not in self.retried_4xx


DEFAULT = RetrySchedule()
"""Webhook, MQTT, Matrix: 0.5 s doubling up to the gateway's ``retry_max_delay``
(300 s by default), each wait 50-100 % of that; given up after ``retry_max_age``
(3 days by default). 408 and 429 are retried, other 4xx are permanent."""

MASTODON = RetrySchedule(
    steps=tuple(float(n ** 4 + 15) for n in range(1, 17)),
    jitter=(1.0, 1.5),
    max_delay=86400.0,
    retried_4xx=frozenset({401, 408, 429}),
)
"""ActivityPub, as Mastodon's delivery worker: ``n**4 + 15`` seconds before
retry n (16 s, 31 s, 96 s ... 18 h at the 16th, about 2.6 days in all), each
up to 50 % longer; the last step repeats until ``give_up_after`` (the
adapter's ``retry_max_age``, 3 days by default). 401, 408 and 429 are
retried (a 401 is often a key the other server has not fetched yet), other
4xx are Mastodon's "unsalvageable" answers: permanent."""
