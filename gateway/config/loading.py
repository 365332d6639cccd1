"""Reading a config: TOML text -> ``Config`` (``parse``, ``load``), then each
platform's settings against its adapter's struct (``validate_adapters``).
Every error names the file, the line (when it can be found) and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from gateway.config.settings import Config, GatewaySettings, LinkConfig, PlatformConfig
from gateway.config.urls import pending_warnings
from gateway.errors import ConfigError
from gateway.ids import PlatformName


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
    token = pending_warnings.set(found)
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
        pending_warnings.reset(token)
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
