"""The typed structs a config file is validated into: ``[gateway]``
(``GatewaySettings``), ``[platforms.NAME]`` (``PlatformConfig``, the adapter's
own struct is checked later), ``[[links]]`` (``LinkConfig``) and the whole
(``Config``). Checks beyond types live in ``__post_init__``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from gateway.config.urls import bad_char, check_url
from gateway.ids import GroupId, GroupRef, LinkName, PlatformName

Name = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class GatewaySettings(Struct, forbid_unknown_fields=True, kw_only=True):
    listen: str = "127.0.0.1:8080"
    """host:port of the HTTP server (site ingress, metrics, admin API)."""
    database: str = "civic-gateway.db"
    """A SQLite file path (the embedded default; a relative one is taken from
    the config file's folder), or a ``postgresql://`` URL (shared by the nodes
    of a cluster)."""
    bus: str = "local"
    """``local``: the in-process bus of one process (the embedded default);
    ``mqtt://[user:password@]host:port`` (or ``mqtts://``): an MQTT 5 broker
    that the nodes of a cluster share. A cluster needs a PostgreSQL database."""
    node: str | None = None
    """This node's name in a cluster (unique per node, stable across restarts);
    default: the host name and the listen port."""
    partitions: Annotated[int, Meta(ge=1, le=4096)] = 64
    """Target groups are spread over this many partitions, each owned by one
    node at a time (the same on every node of a cluster)."""
    lease_ttl: Annotated[float, Meta(ge=1, le=120)] = 5.0
    """Seconds a node's ownership of its partitions lasts without renewal: a
    dead node's groups move to the others within about this time plus a tick."""
    admin_token: str | None = None
    """Bearer token for /admin/v1; the admin API is off when unset."""
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    source: str = "urn:civic-gateway"
    """The CloudEvents ``source`` of what the gateway sends."""
    max_backlog: Annotated[int, Meta(ge=1)] = 1_000_000
    """Undelivered events above which ingress answers 429."""
    retry_max_delay: Annotated[float, Meta(gt=0)] = 300.0
    """Longest wait between two delivery attempts, in seconds."""
    retry_max_age: Annotated[float, Meta(gt=0)] = 3 * 86400.0
    """An event still failing after this many seconds goes to the dead letters."""
    synchronous: Literal["normal", "full"] = "normal"
    """SQLite durability: normal survives a process crash, full also a power cut."""
    body_timeout: Annotated[float, Meta(gt=0, le=300)] = 10.0
    """Seconds a request body (site events, an ActivityPub activity, a Matrix
    transaction) may take to arrive once its headers passed; 408 after."""
    body_budget: Annotated[int, Meta(ge=1024 * 1024, le=4 * 1024 * 1024 * 1024)] = 16 * 1024 * 1024
    """Bytes of request bodies received at once, all requests together; 503
    with Retry-After beyond. Bodies over 64 KiB may use three quarters of it."""

    def __post_init__(self) -> None:
        if not re.match(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):[0-9]{1,5}$", self.listen):
            raise ValueError(f"`listen`: expected host:port, e.g. \"127.0.0.1:8080\", not {self.listen!r}")
        if self.bus != "local" and not self.bus.startswith(("mqtt://", "mqtts://")):
            raise ValueError(f"`bus`: expected \"local\" or an mqtt:// URL, not {self.bus!r}")
        if self.bus != "local":
            check_url("bus", self.bus, ("mqtt", "mqtts"), example="mqtt://broker.example:1883")
        if self.database.startswith(("postgresql://", "postgres://")):
            check_url("database", self.database, ("postgresql", "postgres"), need_host=False,
                      example="postgresql://civic@db.example/civic")
        bad = bad_char(self.source)
        if bad is not None or not self.source:
            raise ValueError(f"`source`: a URI without spaces, e.g. \"urn:civic-gateway\", not {self.source!r}")
        if self.bus != "local" and not self.database.startswith(("postgresql://", "postgres://")):
            raise ValueError("`bus`: a cluster bus needs a shared store: set `database` to a postgresql:// URL")
        if self.node is not None and not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.node):
            raise ValueError(f"`node`: letters, digits, '.', '_' and '-' only (at most 64), not {self.node!r}")


class GroupConfig(Struct, forbid_unknown_fields=True):
    platform: str
    group: Annotated[str, Meta(min_length=1, max_length=512)]


class LinkConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    groups: Annotated[list[GroupConfig], Meta(min_length=2)]
    moderation: Literal["mirror", "advise"] = "mirror"
    """mirror: bans and removals travel and the gateway stops a banned person's
    messages crossing the link; advise: they travel as information only."""
    reactions: bool = True
    """Carry reactions across this link."""

    def refs(self) -> list[GroupRef]:
        return [GroupRef(PlatformName(g.platform), GroupId(g.group)) for g in self.groups]

    @property
    def link_name(self) -> LinkName:
        return LinkName(self.name)


class PlatformConfig(Struct):
    """One ``[platforms.NAME]`` table before its adapter validated it."""

    name: PlatformName
    kind: str
    settings: dict[str, Any]
    adapter_config: Any = None  # filled by validate_adapters()


class Config(Struct):
    gateway: GatewaySettings
    platforms: dict[PlatformName, PlatformConfig]
    links: list[LinkConfig]
    path: str = "<memory>"
    text: str = ""
    warnings: list[str] = []
    """Settings that work but are probably not meant ("file:line: key: why"),
    from ``parse`` and ``validate_adapters``: check-config prints them, run logs them."""
