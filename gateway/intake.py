"""Reading request bodies from outside, within bounds: one reader for every
endpoint that takes a body from the internet (webhook sites, ActivityPub
inboxes, Matrix appservice transactions).

A public endpoint must survive clients that send headers and then most of a
body, slowly or never. So a handler first checks the request's credentials
from its headers alone (signature headers present, timestamp in its window,
a known key or token) and only then calls the ``BodyReader`` the core hands
every adapter (``AdapterContext.read_body``). The reader

* refuses a body over the caller's ``limit`` before reading past it (413);
* gives the whole body ``timeout`` seconds from the first read (408): a body
  that stalls is cut off, and what was read of it is let go;
* counts the bytes of all bodies being read at once against one ``budget``
  for the whole process (503 with ``Retry-After`` beyond it). Bodies past
  ``SMALL_BODY`` may use only ``LARGE_SHARE`` of the budget, so a crowd of
  big stalled bodies cannot starve the small ones most events arrive in.

It reads ``request.content`` piece by piece (never ``request.read()``, which
would take the whole body, up to ``client_max_size``, before any check). A
refusal is a ``BodyError``; each endpoint turns it into its own error format.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.metrics import Metrics

DEFAULT_BUDGET = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0
SMALL_BODY = 64 * 1024
"""A body up to this size may use the whole budget; a bigger one only ``LARGE_SHARE`` of it."""
LARGE_SHARE = 0.75


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's ``malloc_trim(0)``, or None elsewhere. The pieces of bodies
    (read, or read and thrown away after a refusal) are tens of KiB each;
    freed, they stay in the C heap between live objects, and glibc hands
    little of it back on its own (500 stalled uploads left the gateway 18-27
    MiB larger for good). The gateway's housekeeping calls it now and then."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def release() -> None:
        trim(0)
    return release


release_memory = _malloc_trim()


class BodyError(GatewayError):
    """A request body was not read. ``status``: 413 (over the limit), 408 (did
    not arrive in time) or 503 (too many bodies being read at once; answer
    with ``Retry-After: retry_after``)."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BodyReader:
    """One per gateway process (``Gateway`` makes it from ``[gateway]
    body_budget`` and ``body_timeout``); adapters call it as
    ``await ctx.read_body(request, limit)``. Adapters built without a gateway
    (unit tests) get one of their own with the defaults."""

    def __init__(self, budget: int = DEFAULT_BUDGET, timeout: float = DEFAULT_TIMEOUT,
                 metrics: "Metrics | None" = None) -> None:
        self.budget = budget
        self.large_budget = int(budget * LARGE_SHARE)
        self.timeout = timeout
        self.metrics = metrics
        self.in_flight = 0
        """Bytes of bodies being read now, all requests together."""
        # A site told to come back should find room: stalled bodies are cut
        # within ``timeout``, finished ones free theirs at once.
        self.retry_after = max(1, min(5, math.ceil(timeout)))

    async def __call__(self, request: "web.Request", limit: int) -> bytes:
        """The whole body of ``request``, at most ``limit`` bytes; ``BodyError`` otherwise."""
        declared = request.content_length
        if declared is not None and declared > limit:
            raise self._refuse(413, f"body is larger than {limit} bytes")
        if declared is not None and declared > self.large_budget:
            raise self._refuse(413, f"body is larger than the {self.large_budget} bytes the gateway reads at once")
        chunks: list[bytes] = []
        held = 0
        try:
            async with asyncio.timeout(self.timeout):
                while chunk := await request.content.readany():
                    if held + len(chunk) > limit:
                        raise self._refuse(413, f"body is larger than {limit} bytes")
                    self._take(held, len(chunk))
                    held += len(chunk)
                    chunks.append(chunk)
        except TimeoutError:
            raise self._refuse(408, f"the body did not arrive within {self.timeout:g} seconds") from None
        finally:
            self.in_flight -= held
            if self.metrics is not None:
                self.metrics.body_bytes_in_flight.set(self.in_flight)
        return b"".join(chunks)

    def _take(self, held: int, size: int) -> None:
        """Count ``size`` more bytes of a body that holds ``held`` already, or refuse."""
        cap = self.budget if held + size <= SMALL_BODY else self.large_budget
        if self.in_flight + size > cap:
            raise self._refuse(503, "too many request bodies are being received; retry shortly",
                               retry_after=self.retry_after)
        self.in_flight += size
        if self.metrics is not None:
            self.metrics.body_bytes_in_flight.set(self.in_flight)

    def _refuse(self, status: int, message: str, *, retry_after: int | None = None) -> BodyError:
        if self.metrics is not None:
            self.metrics.bodies_refused.labels(str(status)).inc()
        return BodyError(status, message, retry_after=retry_after)
