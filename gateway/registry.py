"""Finds adapter classes by kind through the ``civic_gateway.adapters``
entry-point group, so the core never imports a concrete adapter."""

from __future__ import annotations

from importlib.metadata import entry_points

from gateway.adapter import Adapter

GROUP = "civic_gateway.adapters"


def available() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def find(kind: str) -> type[Adapter]:
    """The adapter class registered for ``kind``; LookupError naming the known kinds."""
    for ep in entry_points(group=GROUP):
        if ep.name == kind:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Adapter)):
                raise LookupError(f"entry point {kind!r} does not name an Adapter subclass")
            return cls
    raise LookupError(f"no adapter of kind {kind!r} is installed (known: {', '.join(available()) or 'none'})")
