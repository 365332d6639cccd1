"""What the store implementations share: a job (a function to run in a
transaction, and the future of its caller) and settling a batch's results."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Job:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[Any], Any], future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future


Result = tuple[asyncio.Future[Any], bool, Any]
"""(the caller's future, whether the job succeeded, its value or exception)."""


def settle(results: list[Result]) -> None:
    """Hand each job's outcome to its caller (on the caller's loop), once."""
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
