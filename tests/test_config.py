"""Config errors name the key and its line; ``check-config`` reports them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway import cli, registry
from gateway.config import Config, parse, validate_adapters
from gateway.errors import ConfigError

SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"  # 24 bytes of key


def platform(name: str, *extra: str, secret: str = SECRET) -> str:
    lines = [f"[platforms.{name}]", 'kind = "webhook"', f'secret = "{secret}"',
             f'url = "http://127.0.0.1:9/{name}"', *extra]
    return "\n".join(lines) + "\n"


LINK = '[[links]]\nname = "together"\ngroups = [{platform = "a", group = "g1"}, {platform = "b", group = "g2"}]\n'
GATEWAY = '[gateway]\nlisten = "127.0.0.1:8080"\ndatabase = "gw.db"\n'


def good_text() -> str:
    return GATEWAY + "\n" + platform("a") + "\n" + platform("b") + "\n" + LINK


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line of the ``occurrence``-th line containing ``needle``."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    return hits[occurrence - 1]


def load_full(text: str) -> Config:
    config = parse(text, "civic.toml")
    validate_adapters(config, registry.find)
    return config


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_full(text)
    return str(info.value)


def test_a_good_config_parses_with_typed_adapter_settings() -> None:
    config = load_full(good_text())
    assert config.gateway.listen == "127.0.0.1:8080"
    assert sorted(config.platforms) == ["a", "b"]
    assert config.platforms["a"].adapter_config.url == "http://127.0.0.1:9/a"
    assert [(r.platform, r.group) for r in config.links[0].refs()] == [("a", "g1"), ("b", "g2")]


def test_unknown_key_in_gateway_names_key_and_line() -> None:
    text = GATEWAY + "admin_tokn = \"x\"\n\n" + platform("a") + "\n" + platform("b") + "\n" + LINK
    msg = error_of(text)
    assert msg.startswith(f"civic.toml:{line_of(text, 'admin_tokn')}: ")
    assert "gateway.admin_tokn" in msg and "unknown key" in msg


def test_unknown_gateway_key_line_is_found_inside_gateway_table_not_an_earlier_one() -> None:
    # `timeout` is a valid webhook key above; in [gateway] it is a typo
    text = platform("a", "timeout = 5") + "\n" + platform("b") + "\n" + GATEWAY + "timeout = 3\n\n" + LINK
    msg = error_of(text)
    assert msg.startswith(f"civic.toml:{line_of(text, 'timeout = 3')}: gateway.timeout: ")


def test_unknown_key_in_a_platform_names_key_and_line_after_adapter_validation() -> None:
    text = GATEWAY + "\n" + platform("a") + "\n" + platform("b", "batchmax = 5") + "\n" + LINK
    config = parse(text, "civic.toml")  # the core does not know adapter keys
    with pytest.raises(ConfigError) as info:
        validate_adapters(config, registry.find)
    msg = str(info.value)
    assert msg.startswith(f"civic.toml:{line_of(text, 'batchmax')}: platforms.b.batchmax: ")
    assert "unknown key" in msg


def test_bad_adapter_value_names_key_and_line() -> None:
    text = GATEWAY + "\n" + platform("a", "batch_max = 0") + "\n" + platform("b") + "\n" + LINK
    msg = error_of(text)
    assert msg.startswith(f"civic.toml:{line_of(text, 'batch_max = 0')}: platforms.a.batch_max: ")
    assert ">= 1" in msg


BAD_SECRETS = [
    pytest.param("sk_QUJDREVGR0hJSktMTU5PUFFSU1RVVldY", "starts with 'whsec_'", id="no-prefix"),
    pytest.param("whsec_not*base64!", "not valid base64", id="not-base64"),
    pytest.param("whsec_QUJDREVGR0g=", "at least 16 bytes", id="too-short"),
]


@pytest.mark.parametrize(("secret", "reason"), BAD_SECRETS)
def test_bad_webhook_secret_is_refused_with_the_reason(secret: str, reason: str) -> None:
    text = GATEWAY + "\n" + platform("a", secret=secret) + "\n" + platform("b") + "\n" + LINK
    msg = error_of(text)
    assert reason in msg and "platforms.a" in msg
    assert msg.startswith("civic.toml:")


@pytest.mark.parametrize(("secret", "reason"), BAD_SECRETS)
def test_bad_webhook_secret_names_the_secret_key_and_its_line(secret: str, reason: str) -> None:
    text = GATEWAY + "\n" + platform("a", secret=secret) + "\n" + platform("b") + "\n" + LINK
    msg = error_of(text)
    assert msg.startswith(f"civic.toml:{line_of(text, 'secret = ')}: platforms.a.secret: ")


def test_link_naming_an_unconfigured_platform() -> None:
    text = GATEWAY + "\n" + platform("a") + "\n" + platform("b") + "\n" + LINK.replace('"b"', '"bee"')
    with pytest.raises(ConfigError) as info:
        parse(text, "civic.toml")
    msg = str(info.value)
    assert msg.startswith(f"civic.toml:{line_of(text, 'groups =')}: links[0].groups: ")
    assert "'bee'" in msg and "not configured" in msg


def test_link_with_one_group() -> None:
    text = (GATEWAY + "\n" + platform("a") + "\n" + platform("b") + "\n"
            + '[[links]]\nname = "lonely"\ngroups = [{platform = "a", group = "g1"}]\n')
    with pytest.raises(ConfigError) as info:
        parse(text, "civic.toml")
    msg = str(info.value)
    assert msg.startswith(f"civic.toml:{line_of(text, 'groups =')}: links[0].groups: ")
    assert "length >= 2" in msg


def test_duplicate_link_names() -> None:
    second = LINK.replace('group = "g1"', 'group = "g3"').replace('group = "g2"', 'group = "g4"')
    text = GATEWAY + "\n" + platform("a") + "\n" + platform("b") + "\n" + LINK + "\n" + second
    with pytest.raises(ConfigError) as info:
        parse(text, "civic.toml")
    msg = str(info.value)
    assert msg.startswith(f"civic.toml:{line_of(text, 'name = ', 2)}: links[1].name: ")
    assert "'together'" in msg and "twice" in msg


def test_invalid_toml_names_the_line() -> None:
    text = GATEWAY + "\n[platforms.a\nkind = \"webhook\"\n"
    with pytest.raises(ConfigError) as info:
        parse(text, "civic.toml")
    msg = str(info.value)
    assert msg.startswith("civic.toml: not valid TOML")
    assert f"line {line_of(text, '[platforms.a')}" in msg


def test_missing_kind() -> None:
    text = GATEWAY + "\n" + platform("a").replace('kind = "webhook"\n', "")
    with pytest.raises(ConfigError) as info:
        parse(text, "civic.toml")
    msg = str(info.value)
    assert "platforms.a.kind" in msg and "missing" in msg
    assert re.match(r"^civic\.toml:\d+: ", msg)


def test_unknown_adapter_kind_lists_the_known_kinds() -> None:
    text = GATEWAY + "\n" + platform("a").replace('kind = "webhook"', 'kind = "matrixx"')
    msg = error_of(text)
    assert msg.startswith(f"civic.toml:{line_of(text, 'matrixx')}: platforms.a.kind: ")
    assert "'matrixx'" in msg
    assert "webhook" in msg.split("known:")[1]


# -- civic-gateway check-config ------------------------------------------------------------

def test_check_config_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "civic.toml"
    path.write_text(good_text(), encoding="utf-8")
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr()
    assert "ok" in out.out and str(path) in out.out
    assert out.err == ""


def test_check_config_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "civic.toml"
    text = GATEWAY + "\n" + platform("a") + "\n" + platform("b", "batchmax = 5") + "\n" + LINK
    path.write_text(text, encoding="utf-8")
    assert cli.main(["check-config", str(path)]) == 2
    out = capsys.readouterr()
    assert "ok" not in out.out
    assert f"{path}:{line_of(text, 'batchmax')}: platforms.b.batchmax" in out.err
    assert "config error" in out.err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.toml"
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "cannot read" in err


def test_listen_must_be_host_and_port(tmp_path, capsys) -> None:
    from gateway.cli import main

    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nlog_format = "text"\nlisten = "localhost"\n')
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "gw.toml:3: gateway.listen: expected host:port" in err


def test_run_names_the_database_it_cannot_open(tmp_path, capsys) -> None:
    from gateway.cli import main

    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\nlisten = "127.0.0.1:0"\ndatabase = "{tmp_path}/no/such/dir/state.db"\n'
                   'log_format = "text"\n')
    import asyncio

    try:
        assert main(["run", "--config", str(cfg)]) == 2
    finally:
        asyncio.set_event_loop_policy(None)  # `run` installs uvloop's policy for the process
    err = capsys.readouterr().err
    assert "gateway.database: cannot open" in err and "no/such/dir/state.db" in err


async def test_backup_copies_a_running_gateways_state(tmp_path, capsys) -> None:
    """civic-gateway backup while the gateway runs: the copy opens as a store and holds what was stored."""
    from gateway.cli import main
    from gateway.store.sqlite import SqliteStore
    from tests.conftest import start_net, stop_net

    net = await start_net(tmp_path, ["a", "b"])
    try:
        sa = net.senders["a"]
        ev = sa.event("civic.message.created", "g-a", {"id": "m1", "author": {"id": "u"}, "text": "keep me"},
                      event_id="backed-up")
        assert (await sa.send([ev]))[0] == 202
        cfg = tmp_path / "gw.toml"
        cfg.write_text(net.gw.config.text)
        dest = tmp_path / "copy.db"
        assert main(["backup", "--config", str(cfg), str(dest)]) == 0
        assert main(["backup", "--config", str(cfg), str(dest)]) == 1  # never overwrites
        assert "exists" in capsys.readouterr().err
    finally:
        await stop_net(net)
    copy = SqliteStore(str(dest))
    await copy.open()
    try:
        from gateway.ids import EventId, PlatformName
        assert await copy.transact(lambda tx: tx.first_seen(PlatformName("a"), EventId("backed-up"), 0.0)) is False
    finally:
        await copy.close()


def test_a_second_platform_of_a_kind_that_allows_one_is_refused_with_its_line() -> None:
    text = ('[gateway]\nlisten = "127.0.0.1:8080"\n[platforms.fedi]\nkind = "activitypub"\n'
            'base_url = "https://a.example"\n[platforms.fedi2]\nkind = "activitypub"\nbase_url = "https://b.example"\n'
            '[[links]]\nname = "l"\ngroups = [{platform = "fedi", group = "x"}, {platform = "fedi2", group = "y"}]\n')
    config = parse(text, "civic.toml")
    with pytest.raises(ConfigError) as err:
        validate_adapters(config, registry.find)
    assert str(err.value) == ("civic.toml:7: platforms.fedi2.kind: one 'activitypub' platform per gateway: "
                              "'fedi' is one already")
    one = parse(text.split("[platforms.fedi2]")[0] + '[platforms.site]\nkind = "webhook"\n'
                'secret = "whsec_c2VjcmV0LWZvci1kb2NzLW9ubHktMTIzNDU2"\nurl = "https://s.example/in"\n'
                '[[links]]\nname = "l"\ngroups = [{platform = "fedi", group = "x"}, {platform = "site", group = "y"}]\n',
                "civic.toml")
    validate_adapters(one, registry.find)  # one is fine
    assert one.platforms["fedi"].adapter_config.base_url == "https://a.example"


# -- URL-valued settings: one check (gateway.config.check_url) for all of them ---------------

MATRIX = ('[platforms.mx]\nkind = "matrix"\nhomeserver = "https://matrix.example.org"\nserver_name = "example.org"\n'
          f'as_token = "{"a" * 32}"\nhs_token = "{"h" * 32}"\nappservice_url = "https://gw.example.org/mx"\n')
URL_PLATFORMS = {
    "webhook": platform("site"),
    "activitypub": '[platforms.fedi]\nkind = "activitypub"\nbase_url = "https://gw.example.org"\n',
    "matrix": MATRIX,
    "mqtt": '[platforms.m]\nkind = "mqtt"\nbroker = "mqtts://broker.example:8883"\n',
}
URL_KEYS = {  # key -> (its platform kind, its table in messages)
    "url": ("webhook", "platforms.site"),
    "base_url": ("activitypub", "platforms.fedi"),
    "homeserver": ("matrix", "platforms.mx"),
    "appservice_url": ("matrix", "platforms.mx"),
    "media_url": ("matrix", "platforms.mx"),
    "broker": ("mqtt", "platforms.m"),
}


def with_url(key: str, value: str) -> str:
    """A config whose ``key`` (one of URL_KEYS) is ``value`` (TOML basic-string text), on a line of its own."""
    kind, _table = URL_KEYS[key]
    table = URL_PLATFORMS[kind]
    lines = [line for line in table.splitlines() if not line.startswith(f"{key} =")]
    lines.append(f'{key} = "{value}"')
    return '[gateway]\nlisten = "127.0.0.1:8080"\n\n' + "\n".join(lines) + "\n"


@pytest.mark.parametrize("key", sorted(URL_KEYS))
@pytest.mark.parametrize(("value", "reason"), [
    ("SCHEME://", "names no host"),
    ("SCHEME://exa mple.org", "a space is not allowed"),
    ("SCHEME://example.org/a b", "a space is not allowed"),
    ("SCHEME://example.org/\\u0007", "U+0007 is not allowed"),
    ("SCHEME://example.org\\t", "U+0009 is not allowed"),
    ("SCHEME://example.org:0", "port must be a number from 1 to 65535"),
    ("SCHEME://example.org:65536", "port must be a number from 1 to 65535"),
    ("SCHEME://example.org:http", "port must be a number from 1 to 65535"),
    ("SCHEME://exa<mple.org", "is not a host name or IP address"),
    ("SCHEME:/example.org", "expected "),
    ("gopher://example.org", "expected "),
])
def test_every_url_setting_is_checked_and_named_with_its_line(key: str, value: str, reason: str) -> None:
    scheme = "mqtts" if key == "broker" else "https"
    text = with_url(key, value.replace("SCHEME", scheme))
    msg = error_of(text)
    table = URL_KEYS[key][1]
    assert msg.startswith(f"civic.toml:{line_of(text, f'{key} =')}: {table}.{key}: "), msg
    assert reason in msg


@pytest.mark.parametrize(("key", "value"), [
    ("url", "https://site.example/civic/inbox"), ("url", "http://[::1]:8080/in"),
    ("url", "http://10.0.0.5:8080/in?x=1"), ("homeserver", "http://synapse:8008"),
    ("media_url", "https://gw.example.org/media"), ("broker", "mqtt://user:pw@broker.example"),
    ("base_url", "https://gw.example.org/"), ("url", "https://bücher.example/in"),
])
def test_good_urls_pass_without_warnings(key: str, value: str) -> None:
    config = load_full(with_url(key, value))
    assert config.warnings == []


def test_bus_and_database_urls_are_checked_too() -> None:
    pg = 'database = "postgresql://civic@db.example/civic"\n'
    text = GATEWAY.replace('database = "gw.db"\n', pg) + 'bus = "mqtt://broker example:1883"\n'
    msg = error_of(text)
    assert msg.startswith(f"civic.toml:{line_of(text, 'bus =')}: gateway.bus: a space is not allowed"), msg
    text = GATEWAY.replace('database = "gw.db"\n', 'database = "postgresql://civic:s3cret@db.example:99999/civic"\n')
    msg = error_of(text)
    assert msg.startswith(f"civic.toml:{line_of(text, 'database =')}: gateway.database: the port must be"), msg
    assert "s3cret" not in msg and "***" in msg  # a password never lands in an error message
    # A Unix-socket PostgreSQL URL has no host, and libpq's several hosts are fine.
    for ok in ("postgresql:///civic?host=/run/postgresql", "postgresql://a.example:5432,b.example:5433/civic"):
        load_full(GATEWAY.replace('database = "gw.db"\n', f'database = "{ok}"\n'))


def test_a_password_in_a_bad_broker_url_is_not_shown() -> None:
    msg = error_of(with_url("broker", "mqtt://civic:hunter2@broker example"))
    assert "platforms.m.broker: a space" in msg and "hunter2" not in msg


@pytest.mark.parametrize("base", ["http://gw.example.org", "http://192.168.1.10:8080", "http://127.example.org"])
def test_activitypub_base_url_must_be_https_off_loopback(base: str) -> None:
    text = with_url("base_url", base)
    msg = error_of(text)
    assert msg == (f"civic.toml:{line_of(text, 'base_url =')}: platforms.fedi.base_url: must be https:// "
                   f"(fediverse servers only talk to https), not {base!r}")


@pytest.mark.parametrize("base", ["http://127.0.0.1:8080", "http://127.3.4.5", "http://localhost:8080",
                                  "http://[::1]:8080"])
def test_check_config_warns_about_plain_http_activitypub_on_loopback(base: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "civic.toml"
    text = with_url("base_url", base)
    path.write_text(text, encoding="utf-8")
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr()
    assert "ok" in out.out
    assert out.err.startswith(f"civic-gateway: warning: {path}:{line_of(text, 'base_url =')}: "
                              f"platforms.fedi.base_url: plain http on "), out.err
    assert "fediverse servers talk to https only" in out.err
    assert len(out.err.splitlines()) == 1
