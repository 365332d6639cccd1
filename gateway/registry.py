"""Finds adapter classes by kind through the ``civic_gateway.adapters``
entry-point group, and an adapter package's own CLI commands through the
``civic_gateway.commands`` group, so the core never imports a concrete adapter."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol

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


# -- platform commands ----------------------------------------------------------------------
# An adapter package can add CLI commands that work on one platform of its
# kind, e.g. ``civic-gateway matrix registration``, through the
# ``civic_gateway.commands`` entry-point group. An entry point is named
# ``<kind>.<command>`` and names an object that follows ``PlatformCommand``.
# The CLI lists the names without importing anything, loads the config, picks
# the platform of that kind (the only one, or ``--platform NAME``), validates
# its settings against ``Config`` (errors name the key and line), and writes
# what the call returns to ``--output`` or standard output.
COMMANDS = "civic_gateway.commands"


class PlatformCommand(Protocol):
    Config: type
    """The msgspec Struct of the kind's ``[platforms.NAME]`` settings."""
    help: str
    """One line for ``--help``."""
    secret: bool
    """The output holds secrets: the CLI creates the file with mode 0600."""

    def __call__(self, platform: str, config: Any) -> str:
        """The text to write, from the platform's name and validated settings."""
        ...


def commands() -> dict[str, list[str]]:
    """kind -> its command names, from the entry-point names (nothing is imported)."""
    found: dict[str, list[str]] = {}
    for ep in entry_points(group=COMMANDS):
        kind, dot, command = ep.name.partition(".")
        if dot and kind and command:
            found.setdefault(kind, []).append(command)
    return {kind: sorted(names) for kind, names in sorted(found.items())}


def find_command(kind: str, command: str) -> PlatformCommand:
    """The command registered as ``<kind>.<command>``; LookupError if there is none
    or it does not follow ``PlatformCommand``."""
    for ep in entry_points(group=COMMANDS):
        if ep.name == f"{kind}.{command}":
            obj = ep.load()
            if not (callable(obj) and isinstance(getattr(obj, "Config", None), type)
                    and isinstance(getattr(obj, "help", None), str)):
                raise LookupError(f"entry point {ep.name!r} does not name a platform command")
            return obj  # type: ignore[no-any-return]
    raise LookupError(f"no command {command!r} for platforms of kind {kind!r} is installed")
