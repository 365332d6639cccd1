"""``civic-gateway``: run, check a config, export the schema, or start the demo.

  civic-gateway run --config FILE        run the gateway
  civic-gateway check-config FILE        validate a config file and exit
  civic-gateway schema export DIR        write the JSON Schema of every type
  civic-gateway backup --config FILE DEST   copy the state to DEST while it runs
  civic-gateway demo [--port N]          the gateway plus two linked demo sites
  civic-gateway KIND COMMAND --config FILE [--platform NAME] [--output PATH]
                                         a command an adapter package adds for platforms
                                         of its kind, e.g. `matrix registration`
  civic-gateway --version                the installed version
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import importlib.metadata
import logging
import os
import signal
import sqlite3
import sys

from gateway import logs
from gateway.errors import ConfigError, GatewayError

log = logging.getLogger("civic.cli")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _run(config_path: str) -> None:
    from gateway.config import load
    from gateway.runtime import Gateway
    from gateway.web.server import port_taken, split_listen

    config = load(config_path)
    logs.setup(config.gateway.log_format, config.gateway.log_level)
    gw = Gateway(config)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    host, port = split_listen(config.gateway.listen)
    busy = GatewayError(f"port {port} on {host} is in use: change [gateway] listen in {config_path}")
    if await port_taken(host, port):
        raise busy
    try:
        await gw.start()
    except sqlite3.Error as exc:
        raise ConfigError(f"{config_path}: gateway.database: cannot open {config.gateway.database!r}: {exc}") from None
    # What start-up built lives as long as the process: keep it out of the
    # cyclic collector's scans (measured: GC took ~8 % of a relay run before).
    gc.freeze()
    try:
        await gw.serve(host, port)
    except OSError as exc:
        await gw.stop()
        if exc.errno == errno.EADDRINUSE:  # taken since port_taken looked
            raise busy from None
        raise ConfigError(f"{config_path}: gateway.listen: cannot listen on {host}:{port}: {exc.strerror}") from None
    log.info("listening", extra={"listen": f"http://{host}:{port}"})
    try:
        await _wait_for_signal()
    finally:
        log.info("stopping")
        await gw.stop()  # the HTTP server first


def cmd_run(args: argparse.Namespace) -> int:
    _install_uvloop()
    asyncio.run(_run(args.config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway import registry
    from gateway.config import load, validate_adapters

    config = load(args.file)
    validate_adapters(config, registry.find)
    for warning in config.warnings:
        print(f"civic-gateway: warning: {warning}", file=sys.stderr)
    database = config.gateway.database
    where = "" if database.startswith(("postgresql://", "postgres://")) else f"; database {database}"
    print(f"{args.file}: ok ({len(config.platforms)} platforms, {len(config.links)} links{where})")
    return 0


def cmd_schema_export(args: argparse.Namespace) -> int:
    from gateway.schema_export import export

    for path in export(args.dir):
        print(path)
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from gateway.config import load
    from gateway.store import sqlite_path
    from gateway.store.sqlite import backup

    path = sqlite_path(load(args.config).gateway.database)

    def progress(done: int, total: int) -> None:
        print(f"\rcopied {done} of {total} pages", end="", file=sys.stderr, flush=True)

    try:
        backup(path, args.dest, progress)
    except (OSError, sqlite3.Error) as exc:
        print(f"civic-gateway: backup failed: {exc}", file=sys.stderr)
        return 1
    print(f"\n{path} -> {args.dest}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo.run import run_demo

    _install_uvloop()
    asyncio.run(run_demo(port=args.port, data_dir=args.data_dir, open_browser=not args.no_browser))
    return 0


def cmd_platform(args: argparse.Namespace) -> int:
    """``civic-gateway KIND COMMAND``: an adapter package's command on one platform
    of its kind (found through ``gateway.registry``, never imported by name)."""
    import msgspec

    from gateway import registry
    from gateway.config import load, validate_adapters

    kind, command = args.kind, args.kind_command
    try:
        hook = registry.find_command(kind, command)
    except LookupError as exc:
        print(f"civic-gateway: {exc}", file=sys.stderr)
        return 1
    config = load(args.config)
    ours = sorted(name for name, pc in config.platforms.items() if pc.kind == kind)
    if args.platform is not None:
        pc = config.platforms.get(args.platform)
        if pc is None or pc.kind != kind:
            what = "is not configured" if pc is None else f"is of kind {pc.kind!r}"
            listed = ", ".join(ours) or "none"
            raise ConfigError(f"{args.config}: platform {args.platform!r} {what} "
                              f"(platforms of kind {kind!r}: {listed})")
        name = args.platform
    elif not ours:
        raise ConfigError(f"{args.config}: no platform has kind = {kind!r}")
    elif len(ours) > 1:
        raise ConfigError(f"{args.config}: {len(ours)} platforms have kind = {kind!r} "
                          f"({', '.join(ours)}): name one with --platform")
    else:
        name = ours[0]
    # Validate only the chosen platform, against the command's settings struct
    # (the key and line are named on error, as check-config does).
    one = msgspec.structs.replace(config, platforms={name: config.platforms[name]})
    validate_adapters(one, lambda _kind: hook)
    text = hook(name, one.platforms[name].adapter_config)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    mode = 0o600 if getattr(hook, "secret", True) else 0o644
    try:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        print(f"civic-gateway: {args.output} exists; remove it first or choose another --output", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"civic-gateway: cannot create {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    print(f"wrote {args.output} ({kind} {command} of platform {name!r})", file=sys.stderr)
    return 0


def _add_platform_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from gateway import registry

    for kind, names in registry.commands().items():
        if kind in sub.choices:
            continue  # never shadow a built-in command
        kp = sub.add_parser(kind, help=f"commands for platforms of kind {kind!r}: {', '.join(names)}")
        kind_sub = kp.add_subparsers(dest="kind_command", required=True)
        for command in names:
            try:
                what = registry.find_command(kind, command).help
            except (LookupError, ImportError) as exc:
                what = f"(cannot be loaded: {exc})"
            c = kind_sub.add_parser(command, help=what, description=what)
            c.add_argument("--config", required=True, help="the TOML config file")
            c.add_argument("--platform", default=None,
                           help=f"the [platforms.NAME] to use (needed when several have kind = {kind!r})")
            c.add_argument("--output", default=None, help="the new file to write (default: standard output)")
            c.set_defaults(func=cmd_platform, kind=kind)


def _demo_port(text: str) -> int:
    """``demo --port``: a port that leaves room for the two sites after it."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= port <= 65533:
        raise argparse.ArgumentTypeError(f"{port}: from 1 to 65533 (the sites use the next two ports)")
    return port


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="civic-gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"civic-gateway {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", required=True, help="the TOML config file")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    schema = sub.add_parser("schema", help="the common schema")
    schema_sub = schema.add_subparsers(dest="schema_command", required=True)
    export = schema_sub.add_parser("export", help="write the JSON Schema of every type into DIR")
    export.add_argument("dir")
    export.set_defaults(func=cmd_schema_export)
    bk = sub.add_parser("backup", help="copy the gateway's state to a new file while it runs")
    bk.add_argument("--config", required=True, help="the TOML config file (its [gateway] database is copied)")
    bk.add_argument("dest", help="the new file to write")
    bk.set_defaults(func=cmd_backup)
    demo = sub.add_parser("demo", help="start the gateway with two linked demo community sites")
    demo.add_argument("--port", type=_demo_port, default=8080, help="gateway port; the sites use the next two")
    demo.add_argument("--data-dir", default=None, help="where the demo keeps its SQLite file (default: a temp dir)")
    demo.add_argument("--no-browser", action="store_true", help="only print the addresses")
    demo.set_defaults(func=cmd_demo)
    _add_platform_commands(sub)
    return p


def version() -> str:
    """The installed package's version (its metadata, so it is the one pip installed)."""
    try:
        return importlib.metadata.version("civic-gateway")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"civic-gateway: config error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:  # a refusal the message explains (a newer database, a busy port)
        print(f"civic-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
