"""The real-Synapse test harness (tests/synapse.py) and the Matrix appservice
registration (``civic-gateway matrix registration``).

First the command on its own: the settings' checks, the YAML it writes, its
errors. Then one Synapse for the module, started with the registration the
command wrote: two people talk in a room version 12 room, and the
appservice's ``as_token`` registers users in its exclusive namespace and
nothing outside it."""

from __future__ import annotations

import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import yaml

from adapters.matrix.config import MatrixConfig
from adapters.matrix.registration import registration, registration_yaml
from gateway import registry
from gateway.cli import main
from tests.services import free_port
from tests.synapse import Synapse, ensure_synapse_shown

SERVER = "civic.test"


def token() -> str:
    return secrets.token_urlsafe(32)


def matrix_table(name: str = "hub", **overrides: str) -> str:
    keys = {"kind": "matrix", "homeserver": "http://127.0.0.1:8008", "server_name": SERVER,
            "as_token": token(), "hs_token": token(), "appservice_url": "http://127.0.0.1:9009/v1/platforms/hub",
            **overrides}
    body = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    return f"[platforms.{name}]\n{body}\n"


WEBHOOK = '[platforms.site]\nkind = "webhook"\nsecret = "whsec_' + "A" * 32 + '"\nurl = "http://127.0.0.1:1/in"\n\n'


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nlisten = "127.0.0.1:8080"\n\n' + text)
    return path


def config(**overrides: str) -> MatrixConfig:
    base = {"homeserver": "https://matrix.example.org/", "server_name": "example.org", "as_token": "a" * 32,
            "hs_token": "h" * 32, "appservice_url": "https://gw.example.org/v1/platforms/hub/"}
    return msgspec.convert({**base, **overrides}, MatrixConfig)


# -- the command ----------------------------------------------------------------------------
def test_the_command_is_found_through_the_registry_by_kind() -> None:
    assert registry.commands().get("matrix") == ["registration"]
    hook = registry.find_command("matrix", "registration")
    assert hook.Config is MatrixConfig and hook.secret is True
    with pytest.raises(LookupError, match="no command 'nope'"):
        registry.find_command("matrix", "nope")


def test_settings_defaults_and_normalised_urls() -> None:
    c = config()
    assert (c.bot_localpart, c.ghost_prefix, c.id) == ("civic", "civic_", "civic-gateway")
    assert c.homeserver == "https://matrix.example.org"
    assert c.appservice_url == "https://gw.example.org/v1/platforms/hub"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"hs_token": "a" * 32}, "`hs_token`: must differ from as_token"),
    ({"as_token": "short"}, "Expected `str` of length >= 32 - at `$.as_token`"),
    ({"hs_token": "h" * 31 + " "}, "at `$.hs_token`"),
    ({"server_name": "example.org/x"}, "at `$.server_name`"),
    ({"homeserver": "matrix.example.org"}, "`homeserver`: expected http:// or https://"),
    ({"appservice_url": "https://gw.example.org/x?token=1"}, "`appservice_url`: expected a base URL"),
    ({"bot_localpart": "Civic"}, "at `$.bot_localpart`"),
    ({"bot_localpart": "civic_bot"}, "`bot_localpart`: 'civic_bot' lies in the ghost namespace"),
    ({"ghost_prefix": ""}, "at `$.ghost_prefix`"),
    ({"id": "civic gateway"}, "at `$.id`"),
])
def test_bad_settings_are_refused_naming_the_key(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        config(**overrides)
    assert message in str(info.value)


def test_registration_holds_the_spec_fields_and_anchored_namespaces() -> None:
    c = config(ghost_prefix="_civic_", bot_localpart="civicbot", id="civic-hub")
    data = yaml.safe_load(registration_yaml(c, "hub"))
    assert data == registration(c)
    assert data["id"] == "civic-hub" and data["url"] == "https://gw.example.org/v1/platforms/hub"
    assert (data["as_token"], data["hs_token"], data["sender_localpart"]) == ("a" * 32, "h" * 32, "civicbot")
    assert data["rate_limited"] is False and data["receive_ephemeral"] is False
    users, aliases = data["namespaces"]["users"], data["namespaces"]["aliases"]
    assert data["namespaces"]["rooms"] == []
    assert [u["exclusive"] for u in users + aliases] == [True, True]
    user_re, alias_re = re.compile(users[0]["regex"]), re.compile(aliases[0]["regex"])
    assert user_re.match("@_civic_mastodon_anna:example.org")
    for other in ("@anna:example.org", "@_civic_anna:exampleXorg", "@_civic_anna:example.org.evil",
                  "#_civic_anna:example.org"):
        assert not user_re.search(other), other
    assert alias_re.match("#_civic_forum:example.org") and not alias_re.search("#forum:example.org")


def test_the_command_writes_a_0600_file_and_refuses_to_overwrite(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, WEBHOOK + matrix_table("hub"))
    out = tmp_path / "civic-appservice.yaml"
    assert main(["matrix", "registration", "--config", str(cfg), "--output", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    written = out.read_text()
    assert yaml.safe_load(written)["namespaces"]["users"][0]["regex"] == r"^@civic_.*:civic\.test$"
    assert "[platforms.hub]" in written.splitlines()[0]
    out.write_text("kept\n")
    assert main(["matrix", "registration", "--config", str(cfg), "--output", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_text() == "kept\n"
    assert main(["matrix", "registration", "--config", str(cfg)]) == 0  # to standard output
    assert yaml.safe_load(capsys.readouterr().out)["sender_localpart"] == "civic"


def test_the_command_picks_the_named_platform_among_several(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, matrix_table("hub-a", id="reg-a") + matrix_table("hub-b", id="reg-b"))
    assert main(["matrix", "registration", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "2 platforms have kind = 'matrix' (hub-a, hub-b): name one with --platform" in err
    assert main(["matrix", "registration", "--config", str(cfg), "--platform", "hub-b"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["id"] == "reg-b"


@pytest.mark.parametrize(("text", "extra", "message"), [
    (WEBHOOK, [], "no platform has kind = 'matrix'"),
    (WEBHOOK + matrix_table("hub"), ["--platform", "site"], "platform 'site' is of kind 'webhook' "
                                                            "(platforms of kind 'matrix': hub)"),
    (WEBHOOK + matrix_table("hub"), ["--platform", "nope"], "platform 'nope' is not configured"),
    (matrix_table("hub", as_token="x" * 40, hs_token="x" * 40), [], "platforms.hub.hs_token: must differ"),
    (matrix_table("hub") + 'typo = "1"\n', [], "platforms.hub.typo: unknown key"),
])
def test_the_command_explains_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                            extra: list[str], message: str) -> None:
    cfg = write_config(tmp_path, text)
    out = tmp_path / "reg.yaml"
    assert main(["matrix", "registration", "--config", str(cfg), "--output", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_key_is_reported_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, WEBHOOK + matrix_table("hub", server_name="bad/name"))
    assert main(["matrix", "registration", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    line = next(i for i, text in enumerate(cfg.read_text().splitlines(), 1) if text.startswith("server_name"))
    assert f"gateway.toml:{line}: platforms.hub.server_name:" in err


# -- a real Synapse with that registration ---------------------------------------------------
class Homeserver:
    def __init__(self, synapse: Synapse, as_token: str) -> None:
        self.synapse = synapse
        self.as_token = as_token


@pytest.fixture(scope="module")
def homeserver(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Homeserver]:
    ensure_synapse_shown(pytestconfig)  # the first run installs Synapse: say so past the capture
    workdir = tmp_path_factory.mktemp("synapse")
    as_token = token()
    cfg = write_config(workdir, matrix_table("hub", as_token=as_token,
                                             appservice_url=f"http://127.0.0.1:{free_port()}/v1/platforms/hub"))
    reg = workdir / "civic-appservice.yaml"
    assert main(["matrix", "registration", "--config", str(cfg), "--output", str(reg)]) == 0
    with Synapse(workdir / "hs", server_name=SERVER, appservices=[reg]) as synapse:
        yield Homeserver(synapse, as_token)


def test_two_people_talk_in_a_room_version_12_room(homeserver: Homeserver) -> None:
    hs = homeserver.synapse
    alice, bob = hs.register_user("alice"), hs.register_user("bob")
    assert (alice.user_id, bob.user_id) == (f"@alice:{SERVER}", f"@bob:{SERVER}")
    assert hs.login("bob", bob.password) != bob.token  # a second session, its own token
    room = hs.create_room(alice.token, invite=[bob.user_id], name="buurt")
    assert room.startswith("!") and ":" not in room  # v12: no server part in room ids
    create = hs.call("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.create/", token=alice.token)
    assert create["room_version"] == "12"
    hs.join(bob.token, room)
    event_id = hs.send_text(alice.token, room, "hallo buren")
    seen = hs.messages(bob.token, room)
    assert [(e["event_id"], e["sender"], e["content"]["body"]) for e in seen] == \
        [(event_id, alice.user_id, "hallo buren")]


def test_open_registration_is_off(homeserver: Homeserver) -> None:
    resp = homeserver.synapse.request("POST", "/_matrix/client/v3/register",
                                      {"username": "mallory", "password": "secret-secret"})
    assert resp.status == 403 and resp.errcode == "M_FORBIDDEN"


def test_the_appservice_registers_ghosts_in_its_namespace_only(homeserver: Homeserver) -> None:
    hs, as_token = homeserver.synapse, homeserver.as_token
    bot = hs.call("GET", "/_matrix/client/v3/account/whoami", token=as_token)
    assert bot["user_id"] == f"@civic:{SERVER}"  # sender_localpart was read
    ghost = {"type": "m.login.application_service", "username": "civic_mastodon_anna", "inhibit_login": True}
    done = hs.call("POST", "/_matrix/client/v3/register", ghost, token=as_token)
    assert done["user_id"] == f"@civic_mastodon_anna:{SERVER}"
    who = hs.call("GET", "/_matrix/client/v3/account/whoami", token=as_token,
                  query={"user_id": done["user_id"]})
    assert who["user_id"] == done["user_id"]

    outside = hs.request("POST", "/_matrix/client/v3/register", {**ghost, "username": "anna"}, token=as_token)
    assert outside.status == 400 and outside.errcode == "M_EXCLUSIVE"
    wrong = hs.request("POST", "/_matrix/client/v3/register", {**ghost, "username": "civic_piet"}, token=token())
    assert wrong.status == 401 and wrong.errcode == "M_UNKNOWN_TOKEN"


def test_the_alias_namespace_is_exclusive(homeserver: Homeserver) -> None:
    hs = homeserver.synapse
    carol = hs.register_user("carol")
    room = hs.create_room(carol.token)
    taken = hs.request("PUT", f"/_matrix/client/v3/directory/room/%23civic_forum:{SERVER}", {"room_id": room},
                       token=carol.token)
    assert taken.status == 400 and taken.errcode == "M_EXCLUSIVE"
    hs.call("PUT", f"/_matrix/client/v3/directory/room/%23forum:{SERVER}", {"room_id": room}, token=carol.token)
