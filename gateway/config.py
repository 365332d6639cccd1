"""Configuration: one TOML file, validated into typed structs.

``[gateway]`` holds the process settings, ``[platforms.NAME]`` one platform
instance each (``kind`` picks the adapter, the rest is that adapter's
settings), ``[[links]]`` the groups that behave as one. Unknown keys are
errors (a typo must not silently fall back to a default), and every error
names the key and, when it can be found, its line.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
import tomllib
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

import msgspec
from msgspec import Meta, Struct

from gateway.errors import ConfigError
from gateway.ids import GroupId, GroupRef, LinkName, PlatformName

Name = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


# -- URL-valued settings -----------------------------------------------------------------
#
# One check for every URL a config holds (the core's and each adapter's), called
# from the settings structs' ``__post_init__``. Errors are ``ValueError("`key`: ...")``,
# which ``_convert`` turns into "file:line: table.key: ..." like every config error;
# warnings go through ``warn`` and come out the same way in ``Config.warnings``.

_warnings: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "civic_config_warnings", default=None)
_HOST = re.compile(r"^[\w.-]+$")  # letters (any script), digits, '_', '.', '-'


def warn(key: str, message: str) -> None:
    """Called from a settings struct's ``__post_init__``: a setting that works
    but probably should not be used as it is. ``check-config`` prints it and
    ``run`` logs it, with the file, line and key (outside a config conversion
    it is dropped)."""
    found = _warnings.get()
    if found is not None:
        found.append((key, message))


def is_loopback(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ``::1``."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bad_char(value: str) -> str | None:
    for ch in value:
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            return "a space" if ch == " " else f"the character U+{ord(ch):04X}"
    return None


def _redacted(url: str) -> str:
    """``url`` for an error message: a password in it shown as ``***``."""
    return repr(re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@]*?:)[^/@]*@", r"\1***@", url))


def check_url(key: str, url: str, schemes: tuple[str, ...], *, example: str, need_host: bool = True,
              public_tls: bool = False) -> SplitResult:
    """Check the URL-valued setting ``key`` and return its parts; a settings
    struct's ``__post_init__`` calls it for each URL it holds. Refused (with
    ``ValueError("`key`: ...")``): a scheme not in ``schemes``; whitespace or a
    control character anywhere (percent-encode them); no host (unless
    ``need_host`` is false, e.g. a PostgreSQL URL over a Unix socket); a host
    that is not a name or an IP address; a port outside 1..65535.

    ``public_tls``: the URL is where other servers on the internet reach the
    gateway (ActivityPub's ``base_url``), so it must be ``https``; plain
    ``http`` is only accepted on a loopback host (tests, a reverse proxy's
    upstream), with a warning."""
    shown = f"e.g. \"{example}\""
    shown_url = _redacted(url)
    bad = _bad_char(url)
    if bad is not None:
        raise ValueError(f"`{key}`: {bad} is not allowed in a URL (percent-encode it), in {shown_url}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. a bracketed host that is not an IPv6 address
        raise ValueError(f"`{key}`: not a valid URL ({exc}): {shown_url}") from None
    if parts.scheme.lower() not in schemes or not url.lower().startswith(parts.scheme.lower() + "://"):
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"`{key}`: expected {wanted}..., {shown}, not {shown_url}")
    multi_host = "," in parts.netloc  # libpq's host1:port1,host2:port2
    host = parts.hostname or ""
    if need_host and not host.strip("."):
        raise ValueError(f"`{key}`: the URL names no host, {shown}, not {shown_url}")
    if host and not multi_host and "[" not in parts.netloc and not _HOST.match(host):
        raise ValueError(f"`{key}`: {host!r} is not a host name or IP address, {shown}")
    if not multi_host:
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"`{key}`: the port must be a number from 1 to 65535, in {shown_url}")
    if public_tls and parts.scheme.lower() != "https":
        if not is_loopback(host):
            raise ValueError(f"`{key}`: must be https:// (fediverse servers only talk to https), not {shown_url}")
        warn(key, f"plain http on {host} is only reachable from this machine, and fediverse servers "
                  f"talk to https only: use this for tests, not for the public address")
    return parts


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
        bad = _bad_char(self.source)
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


def _line_of(text: str, path: list[str | int]) -> int | None:
    """Best effort: the line of a key in TOML text, for error messages."""
    lines = text.splitlines()
    start = 0
    if path and path[0] == "platforms" and len(path) >= 2:
        header = re.compile(rf"^\s*\[\s*platforms\.\"?{re.escape(str(path[1]))}\"?\s*\]")
        for i, line in enumerate(lines):
            if header.match(line):
                start = i
                break
        keys = [p for p in path[2:] if isinstance(p, str)]
    elif path and path[0] == "links":
        idx = path[1] if len(path) > 1 and isinstance(path[1], int) else 0
        seen = -1
        for i, line in enumerate(lines):
            if re.match(r"^\s*\[\[\s*links\s*\]\]", line):
                seen += 1
                if seen == idx:
                    start = i
                    break
        keys = [p for p in path[2:] if isinstance(p, str)]
    elif path and path[0] == "gateway":
        for i, line in enumerate(lines):
            if re.match(r"^\s*\[\s*gateway\s*\]", line):
                start = i
                break
        keys = [p for p in path[1:] if isinstance(p, str)]
    else:
        keys = [p for p in path if isinstance(p, str)]
    if not keys:
        return start + 1 if start or lines else None
    key = re.compile(rf"^\s*\"?{re.escape(keys[0])}\"?\s*=")
    for i in range(start, len(lines)):
        if i > start and re.match(r"^\s*\[", lines[i]):
            break
        if key.match(lines[i]) or re.search(rf"\b{re.escape(keys[0])}\s*=", lines[i]):
            return i + 1
    return start + 1


def _located(cfg_path: str, text: str, path: list[str | int], message: str) -> str:
    dotted = ".".join(f"[{p}]" if isinstance(p, int) else p for p in path).replace(".[", "[")
    line = _line_of(text, path)
    where = f"{cfg_path}:{line}" if line else cfg_path
    return f"{where}: {dotted}: {message}"


def _error(cfg_path: str, text: str, path: list[str | int], message: str) -> ConfigError:
    return ConfigError(_located(cfg_path, text, path, message))


def _convert(value: Any, typ: type, cfg_path: str, text: str, prefix: list[str | int],
             warnings: list[str] | None = None) -> Any:
    """``msgspec.convert`` with errors (and the ``warn``ings of ``__post_init__``
    checks, appended to ``warnings``) naming the key and its line."""
    found: list[tuple[str, str]] = []
    token = _warnings.set(found)
    try:
        result = msgspec.convert(value, typ)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = re.search(r" - at `\$(.*)`$", msg)
        sub: list[str | int] = []
        if m:
            for part in re.findall(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]", m.group(1)):
                sub.append(part[0] if part[0] else int(part[1]))
            msg = msg[: m.start()]
        m2 = re.match(r"Object contains unknown field `(.+)`", msg)
        if m2:
            sub.append(m2.group(1))
            msg = "unknown key (a typo?)"
        m3 = re.match(r"Object missing required field `(.+)`", msg)
        if m3:
            sub.append(m3.group(1))
            msg = "required key is missing"
        m4 = re.match(r"`([A-Za-z0-9_-]+)`: (.+)", msg)  # a check in a Config's __post_init__
        if m4:
            sub.append(m4.group(1))
            msg = m4.group(2)
        raise _error(cfg_path, text, prefix + sub, msg) from None
    finally:
        _warnings.reset(token)
    if warnings is not None:
        for key, message in found:
            line = _located(cfg_path, text, [*prefix, key], message)
            if line not in warnings:
                warnings.append(line)
    return result


def parse(text: str, path: str = "<memory>") -> Config:
    """Parse and validate config text (adapter settings are checked later by
    ``validate_adapters``, which needs the adapter registry)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(raw) - {"gateway", "platforms", "links"}
    if unknown:
        key = sorted(unknown)[0]
        raise _error(path, text, [key], "unknown top-level table (expected gateway, platforms, links)")
    warnings: list[str] = []
    gateway = _convert(raw.get("gateway", {}), GatewaySettings, path, text, ["gateway"], warnings)
    platforms: dict[PlatformName, PlatformConfig] = {}
    for name, table in (raw.get("platforms") or {}).items():
        if not isinstance(table, dict):
            raise _error(path, text, ["platforms", name], "must be a table")
        if not re.match(r"^[a-z0-9][a-z0-9_-]{0,63}$", name):
            raise _error(path, text, ["platforms", name],
                         "platform names use lower-case letters, digits, - and _ (at most 64)")
        settings = dict(table)
        kind = settings.pop("kind", None)
        if not isinstance(kind, str):
            raise _error(path, text, ["platforms", name, "kind"], "required key is missing (e.g. kind = \"webhook\")")
        platforms[PlatformName(name)] = PlatformConfig(PlatformName(name), kind, settings)
    links = _convert(raw.get("links", []), list[LinkConfig], path, text, ["links"])
    seen_names: set[str] = set()
    for i, link in enumerate(links):
        if link.name in seen_names:
            raise _error(path, text, ["links", i, "name"], f"link name {link.name!r} is used twice")
        seen_names.add(link.name)
        refs = link.refs()
        for j, ref in enumerate(refs):
            if ref.platform not in platforms:
                raise _error(path, text, ["links", i, "groups"],
                             f"group {j} names platform {ref.platform!r}, which is not configured")
        if len(set(refs)) != len(refs):
            raise _error(path, text, ["links", i, "groups"], "a group is listed twice")
    return Config(gateway=gateway, platforms=platforms, links=links, path=path, text=text, warnings=warnings)


def resolve_database(database: str, folder: str | Path) -> str:
    """A relative SQLite ``database`` path (or ``sqlite:///relative``) made
    absolute against ``folder``, the config file's; URLs and absolute paths
    are returned as they are. So the gateway finds its state wherever it is
    started from (a service manager's working directory is often ``/``)."""
    if database.startswith(("postgresql://", "postgres://")) or database == ":memory:":
        return database
    prefix = "sqlite:///" if database.startswith("sqlite:///") else ""
    file = database[len(prefix):]
    if os.path.isabs(file):
        return database
    return prefix + os.path.join(os.path.abspath(folder), file)


def load(path: str | Path) -> Config:
    """The config in the file at ``path`` (called by every CLI command): as
    ``parse``, with a relative SQLite ``database`` resolved against the file's
    folder (``resolve_database``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config file: {exc.strerror}") from None
    config = parse(text, str(p))
    config.gateway.database = resolve_database(config.gateway.database, p.parent)
    return config


def validate_adapters(config: Config, find_adapter: Any) -> None:
    """Check every platform's settings against its adapter's config struct and
    store the result in ``adapter_config``. ``find_adapter(kind)`` returns the class."""
    first_of_kind: dict[str, str] = {}
    for name, pc in config.platforms.items():
        try:
            cls = find_adapter(pc.kind)
        except LookupError as exc:
            raise _error(config.path, config.text, ["platforms", name, "kind"], str(exc)) from None
        if getattr(cls, "only_one", False):
            other = first_of_kind.setdefault(pc.kind, name)
            if other != name:
                raise _error(config.path, config.text, ["platforms", name, "kind"],
                             f"one {pc.kind!r} platform per gateway: {other!r} is one already")
        pc.adapter_config = _convert(pc.settings, cls.Config, config.path, config.text, ["platforms", name],
                                     config.warnings)
