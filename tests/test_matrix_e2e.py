"""The Matrix adapter end to end: a real Synapse on 127.0.0.1, the gateway (in
this process), and a webhook site, with one Matrix room linked to the site's
group.

One Synapse serves the module; its appservice registration points at a fixed
gateway port, and every test starts a fresh gateway (fresh SQLite) there and a
fresh room. Synapse's blocking test helpers run in threads, so the gateway on
this event loop keeps answering the homeserver meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from adapters.matrix.config import MatrixConfig
from adapters.matrix.registration import registration_yaml
from gateway.runtime import Gateway
from gateway.config import parse
from tests.sitekit import Sender, Site, new_secret
from tests.synapse import Synapse, User, _q, ensure_synapse_shown
from tests.services import free_port

SERVER = "civic.test"
PREFIX = "/v1/platforms/hub"


@dataclass
class Hub:
    synapse: Synapse
    config: MatrixConfig
    port: int
    workdir: Path
    alice: User
    bot: str = f"@civic:{SERVER}"

    def toml(self, **extra: Any) -> str:
        c = self.config
        lines = [f'[platforms.hub]\nkind = "matrix"\nhomeserver = "{c.homeserver}"\nserver_name = "{SERVER}"\n'
                 f'as_token = "{c.as_token}"\nhs_token = "{c.hs_token}"\nappservice_url = "{c.appservice_url}"\n'
                 f'media_fetch_private = true\n']
        lines += [f"{k} = {v!r}\n".replace("'", '"') for k, v in extra.items()]
        return "".join(lines)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Hub]:
    ensure_synapse_shown(pytestconfig)
    workdir = tmp_path_factory.mktemp("matrix-e2e")
    port, synapse_port = free_port(), free_port()
    config = msgspec.convert({"homeserver": f"http://127.0.0.1:{synapse_port}", "server_name": SERVER,
                              "as_token": secrets.token_urlsafe(32), "hs_token": secrets.token_urlsafe(32),
                              "appservice_url": f"http://127.0.0.1:{port}{PREFIX}"}, MatrixConfig)
    reg = workdir / "civic-appservice.yaml"
    reg.write_text(registration_yaml(config, "hub"))
    with Synapse(workdir / "hs", server_name=SERVER, appservices=[reg], port=synapse_port) as synapse:
        alice = synapse.register_user("alice")
        synapse.call("PUT", f"/_matrix/client/v3/profile/{_q(alice.user_id)}/displayname",
                     {"displayname": "Alice A."}, token=alice.token)
        yield Hub(synapse, config, port, workdir, alice)


@dataclass
class Net:
    hub: Hub
    gw: Gateway
    site: Site
    sender: Sender
    room: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hs(self) -> Synapse:
        return self.hub.synapse

    async def call(self, method: str, path: str, body: Any = None, *, token: str, **kw: Any) -> Any:
        return await asyncio.to_thread(self.hs.call, method, path, body, token=token, **kw)

    async def send(self, user: User, content: dict[str, Any], event_type: str = "m.room.message",
                   room: str | None = None) -> str:
        path = (f"/_matrix/client/v3/rooms/{_q(room or self.room)}/send/{event_type}/{secrets.token_hex(8)}")
        done = await self.call("PUT", path, content, token=user.token)
        return str(done["event_id"])

    async def events(self, user: User, limit: int = 100) -> list[dict[str, Any]]:
        """The room's latest events, oldest first, as ``user`` sees them."""
        done = await self.call("GET", f"/_matrix/client/v3/rooms/{_q(self.room)}/messages", token=user.token,
                               query={"dir": "b", "limit": str(limit)})
        return list(reversed(done["chunk"]))

    async def member(self, user_id: str) -> dict[str, Any] | None:
        r = await asyncio.to_thread(self.hs.request, "GET",
                                    f"/_matrix/client/v3/rooms/{_q(self.room)}/state/m.room.member/{_q(user_id)}",
                                    token=self.hub.alice.token)
        return r.body if r.status == 200 else None

    def site_events(self, etype: str) -> list[dict[str, Any]]:
        return self.site.of_type(etype)


async def new_room(hub: Hub, creator: User, *, bot_level: int = 100) -> str:
    """A room of ``creator``'s with the bot invited (it accepts by itself) and given ``bot_level``."""
    hs = hub.synapse
    room = await asyncio.to_thread(hs.create_room, creator.token, invite=[hub.bot])
    levels = await asyncio.to_thread(hs.call, "GET", f"/_matrix/client/v3/rooms/{_q(room)}/state/m.room.power_levels",
                                     token=creator.token)
    levels.setdefault("users", {})[hub.bot] = bot_level
    await asyncio.to_thread(hs.call, "PUT", f"/_matrix/client/v3/rooms/{_q(room)}/state/m.room.power_levels/",
                            levels, token=creator.token)
    return room


async def start_gateway(hub: Hub, tmp_path: Path, site: Site, room: str, **matrix_extra: Any) -> Gateway:
    text = (f'[gateway]\nlisten = "127.0.0.1:{hub.port}"\ndatabase = "{tmp_path}/gw.db"\nlog_format = "text"\n'
            f'retry_max_delay = 0.5\n' + hub.toml(**matrix_extra) + site.config(batch_max=1)
            + f'[[links]]\nname = "together"\ngroups = [{{platform = "hub", group = "{room}"}}, '
              f'{{platform = "site", group = "g-site"}}]\n')
    gw = Gateway(parse(text, "test.toml"))
    await gw.start()
    await gw.serve("127.0.0.1", hub.port)
    return gw


async def until(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def linked(hub: Hub, tmp_path: Path, room: str | None = None, **matrix_extra: Any) -> AsyncIterator[Net]:
    """A fresh gateway and webhook site, the site's group linked to ``room``
    (default: a new room of Alice's) with the bot in it."""
    site = Site("site", new_secret(), prefix="s-")
    await site.start()
    room = room or await new_room(hub, hub.alice)
    gw = await start_gateway(hub, tmp_path, site, room, **matrix_extra)
    sender = Sender(f"http://127.0.0.1:{hub.port}", "site", site.secret)
    n = Net(hub, gw, site, sender, room)
    try:
        await until(lambda: _joined(n, hub.bot), what="the bot to accept the invite and join")
        yield n
    finally:
        await sender.close()
        if gw._runner is not None:
            await gw._runner.cleanup()
        await gw.stop()
        await site.stop()


@pytest.fixture
async def net(hub: Hub, tmp_path: Path) -> AsyncIterator[Net]:
    async with linked(hub, tmp_path) as n:
        yield n


async def _joined(n: Net, user: str) -> bool:
    m = await n.member(user)
    return bool(m and m.get("membership") == "join")


def site_msg(mid: str, text: str, *, author: str = "bob", name: str = "Bob", identity: str = "pseudonymous",
             **extra: Any) -> dict[str, Any]:
    return {"id": mid, "author": {"id": author, "name": name, "identity": identity}, "text": text, **extra}


def by_type(events: list[dict[str, Any]], etype: str, sender: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == etype and (sender is None or e["sender"] == sender)]


# -- Matrix -> site ---------------------------------------------------------------------------------

async def test_matrix_message_reply_edit_reaction_redaction_reach_the_site_with_its_ids(net: Net) -> None:
    alice = net.hub.alice
    first = await net.send(alice, {"msgtype": "m.text", "body": "Hello from the hub",
                                   "format": "org.matrix.custom.html",
                                   "formatted_body": "Hello from <b>the hub</b><script>x()</script>"})
    got = (await until(lambda: net.site_events("civic.message.created"), what="the message at the site"))[0]
    data = got["data"]
    assert got["subject"] == "g-site" and got["civicorigin"] == "hub"
    assert data["text"] == "Hello from the hub" and data["html"] == "Hello from <b>the hub</b>"
    assert data["author"]["name"] == "Alice A." and data["author"]["id"] != alice.user_id  # a stand-in id
    site_first = net.site.own_ids[data["id"]]

    reply = await net.send(alice, {"msgtype": "m.text", "body": "and a reply",
                                   "m.relates_to": {"m.in_reply_to": {"event_id": first}}})
    await until(lambda: len(net.site_events("civic.message.created")) == 2, what="the reply")
    assert net.site_events("civic.message.created")[1]["data"]["reply_to"] == site_first

    await net.send(alice, {"msgtype": "m.text", "body": "* Hello again", "m.new_content": {
        "msgtype": "m.text", "body": "Hello again from the hub"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": first}})
    edit = (await until(lambda: net.site_events("civic.message.edited"), what="the edit"))[0]["data"]
    assert edit["id"] == site_first and edit["text"] == "Hello again from the hub"

    reaction = await net.send(alice, {"m.relates_to": {"rel_type": "m.annotation", "event_id": first, "key": "👍"}},
                              "m.reaction")
    added = (await until(lambda: net.site_events("civic.reaction.added"), what="the reaction"))[0]["data"]
    assert added["message"] == site_first and added["key"] == "👍"

    # redacting the reaction removes it; redacting her own message deletes it (not a moderation)
    await net.call("PUT", f"/_matrix/client/v3/rooms/{_q(net.room)}/redact/{_q(reaction)}/r1", {}, token=alice.token)
    removed = (await until(lambda: net.site_events("civic.reaction.removed"), what="reaction removed"))[0]["data"]
    assert removed["message"] == site_first and removed["key"] == "👍"
    await net.call("PUT", f"/_matrix/client/v3/rooms/{_q(net.room)}/redact/{_q(reply)}/r2",
                   {"reason": "typo"}, token=alice.token)
    deleted = (await until(lambda: net.site_events("civic.message.deleted"), what="the deletion"))[0]["data"]
    assert deleted["id"] == net.site.own_ids[net.site_events("civic.message.created")[1]["data"]["id"]]
    assert not net.site_events("civic.moderation.action")


async def test_a_spoiler_arrives_as_a_content_warning_and_a_warning_leaves_as_a_spoiler(net: Net) -> None:
    alice = net.hub.alice
    await net.send(alice, {"msgtype": "m.text", "body": "CW: medical details\n\nthe results are in",
                           "format": "org.matrix.custom.html",
                           "formatted_body": '<span data-mx-spoiler="medical details">the results are in</span>'})
    data = (await until(lambda: net.site_events("civic.message.created"), what="spoiler"))[0]["data"]
    assert data["warning"] == "medical details" and data["text"] == "the results are in"

    await net.sender.send([net.sender.event("civic.message.created", "g-site", site_msg(
        "w-1", "my diagnosis story", warning="illness, hospital"))])

    async def ghost_message() -> dict[str, Any] | None:
        for e in await net.events(alice):
            if e["type"] == "m.room.message" and e["sender"].startswith("@civic_"):
                return e
        return None
    event = await until(ghost_message, what="the site's message in the room")
    content = event["content"]
    assert content["body"] == "CW: illness, hospital\n\nmy diagnosis story"
    assert content["formatted_body"] == '<span data-mx-spoiler="illness, hospital">my diagnosis story</span>'


# -- site -> Matrix ---------------------------------------------------------------------------------

async def test_site_messages_appear_as_the_right_ghost_threaded_and_edited(net: Net) -> None:
    alice = net.hub.alice
    matrix_first = await net.send(alice, {"msgtype": "m.text", "body": "question from the hub"})
    gw_first = (await until(lambda: net.site_events("civic.message.created"), what="hub message"))[0]["data"]["id"]
    site_first = net.site.own_ids[gw_first]

    s = net.sender
    started = time.time()
    await s.send([s.event("civic.message.created", "g-site", site_msg("b-1", "an answer from the site",
                                                                        reply_to=site_first))])
    await s.send([s.event("civic.message.created", "g-site", site_msg(
        "a-1", "I prefer not to be named", author="dora", name="Dora Secret", identity="anonymous"))])

    async def from_ghosts() -> list[dict[str, Any]]:
        got = [e for e in by_type(await net.events(alice), "m.room.message") if e["sender"].startswith("@civic_")]
        return got if len(got) == 2 else []
    bob_msg, dora_msg = await until(from_ghosts, what="both site messages in the room")
    assert bob_msg["content"]["body"] == "an answer from the site"
    assert bob_msg["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": matrix_first}}
    assert bob_msg["origin_server_ts"] / 1000 >= started - 5  # the site's time, via ?ts=
    bob, dora = bob_msg["sender"], dora_msg["sender"]
    assert bob != dora and bob.endswith(":" + SERVER)
    assert (await net.member(bob))["displayname"] == "Bob"
    assert (await net.member(dora))["displayname"] == "anonymous member"
    assert "dora" not in dora.lower() and "secret" not in dora.lower()

    # the site edits its message: an m.replace of the event the room has, sent by the same ghost
    await s.send([s.event("civic.message.edited", "g-site", site_msg("b-1", "a better answer"))])

    async def the_edit() -> dict[str, Any] | None:
        for e in by_type(await net.events(alice), "m.room.message", bob):
            rel = e["content"].get("m.relates_to", {})
            if rel.get("rel_type") == "m.replace":
                return e
        return None
    edit = await until(the_edit, what="the edit in the room")
    assert edit["content"]["m.relates_to"]["event_id"] == bob_msg["event_id"]
    assert edit["content"]["m.new_content"]["body"] == "a better answer"

    # a thread under Alice's message, mentioning her as the site knows her: m.thread and m.mentions
    alice_at_site = net.site_events("civic.message.created")[0]["data"]["author"]["id"]
    await s.send([s.event("civic.message.created", "g-site", site_msg(
        "b-2", "more in a thread", thread=site_first, mentions=[{"id": alice_at_site, "name": "Alice"}]))])

    async def the_thread() -> dict[str, Any] | None:
        for e in by_type(await net.events(alice), "m.room.message", bob):
            if e["content"].get("m.relates_to", {}).get("rel_type") == "m.thread":
                return e
        return None
    thread = await until(the_thread, what="the thread reply in the room")
    assert thread["content"]["m.relates_to"]["event_id"] == matrix_first
    assert thread["content"]["m.relates_to"]["is_falling_back"] is True
    assert thread["content"]["m.mentions"] == {"user_ids": [alice.user_id]}

    # a role at the site: the ghost gets a moderator's power level in the room
    await s.send([s.event("civic.membership.changed", "g-site", {"member": {"id": "bob", "name": "Bob"},
                                                                 "state": "role_changed", "role": "admin"})])

    async def bob_level() -> int:
        levels = await net.call("GET", f"/_matrix/client/v3/rooms/{_q(net.room)}/state/m.room.power_levels",
                                token=alice.token)
        return int(levels.get("users", {}).get(bob, 0))
    assert await until(bob_level, what="bob's power level") == 50  # a remote admin is a moderator here

    # and deletes it: redacted by its own ghost
    await s.send([s.event("civic.message.deleted", "g-site", {"id": "b-1"})])

    async def redacted() -> bool:
        r = await asyncio.to_thread(net.hs.request, "GET", f"/_matrix/client/v3/rooms/{_q(net.room)}/event/"
                                    f"{_q(bob_msg['event_id'])}", token=alice.token)
        return r.status == 200 and not r.body["content"] and r.body["unsigned"]["redacted_because"]["sender"] == bob
    await until(redacted, what="the redaction by the ghost")


async def test_a_site_reaction_and_its_removal(net: Net) -> None:
    alice = net.hub.alice
    first = await net.send(alice, {"msgtype": "m.text", "body": "react to me"})
    gw_id = (await until(lambda: net.site_events("civic.message.created"), what="message"))[0]["data"]["id"]
    s = net.sender
    await s.send([s.event("civic.reaction.added", "g-site", {"message": net.site.own_ids[gw_id],
                                                             "author": {"id": "bob", "name": "Bob"}, "key": "🎉"})])

    async def reactions() -> list[dict[str, Any]]:
        done = await net.call("GET", f"/_matrix/client/v1/rooms/{_q(net.room)}/relations/{_q(first)}/m.annotation",
                              token=alice.token)
        return done["chunk"]
    got = (await until(reactions, what="the reaction"))[0]
    assert got["content"]["m.relates_to"]["key"] == "🎉" and got["sender"].startswith("@civic_")
    await s.send([s.event("civic.reaction.removed", "g-site", {"message": net.site.own_ids[gw_id],
                                                               "author": {"id": "bob", "name": "Bob"}, "key": "🎉"})])
    await until(lambda: _none(reactions), what="the reaction redacted")


async def _none(fn: Callable[[], Any]) -> bool:
    return not await fn()


# -- memberships and moderation ---------------------------------------------------------------------

async def test_kicks_and_bans_travel_both_ways(net: Net) -> None:
    hub, alice, s = net.hub, net.hub.alice, net.sender
    carol = await asyncio.to_thread(hub.synapse.register_user, f"carol{secrets.token_hex(3)}")
    await net.call("POST", f"/_matrix/client/v3/rooms/{_q(net.room)}/invite", {"user_id": carol.user_id},
                   token=alice.token)
    await net.call("POST", f"/_matrix/client/v3/join/{_q(net.room)}", {}, token=carol.token)
    joined = await until(lambda: [e for e in net.site_events("civic.membership.changed")
                                  if e["data"]["state"] == "joined"], what="carol's join at the site")
    carol_at_site = joined[0]["data"]["member"]["id"]

    # the site's people appear as ghosts; a Matrix kick and ban of them reach the site
    for who in ("bob", "eve"):
        await s.send([s.event("civic.membership.changed", "g-site",
                              {"member": {"id": who, "name": who.title()}, "state": "joined"})])
    ghosts = await until(lambda: _ghost_members(net, 2), what="two ghosts joined")
    bob_ghost = next(g for g, name in ghosts.items() if name == "Bob")
    eve_ghost = next(g for g, name in ghosts.items() if name == "Eve")
    await net.call("POST", f"/_matrix/client/v3/rooms/{_q(net.room)}/kick",
                   {"user_id": bob_ghost, "reason": "off topic"}, token=alice.token)
    await net.call("POST", f"/_matrix/client/v3/rooms/{_q(net.room)}/ban",
                   {"user_id": eve_ghost, "reason": "spam"}, token=alice.token)
    states = await until(lambda: _site_states(net, {"kicked", "banned"}), what="kick and ban at the site")
    assert states["kicked"]["member"]["id"] == "bob" and states["kicked"]["reason"] == "off topic"
    assert states["banned"]["member"]["id"] == "eve" and states["banned"]["by"]["name"] == "Alice A."

    # the site kicks carol and bans alice's stand-in: the bot does it in the room
    await s.send([s.event("civic.membership.changed", "g-site", {"member": {"id": carol_at_site},
                                                                 "state": "kicked", "by": {"id": "mod", "name": "Mo"},
                                                                 "reason": "rude"})])
    left = await until(lambda: _membership_is(net, carol.user_id, "leave"), what="carol kicked in the room")
    assert left["reason"] == "rude"
    dave = await asyncio.to_thread(hub.synapse.register_user, f"dave{secrets.token_hex(3)}")
    await net.call("POST", f"/_matrix/client/v3/rooms/{_q(net.room)}/invite", {"user_id": dave.user_id},
                   token=alice.token)
    await net.call("POST", f"/_matrix/client/v3/join/{_q(net.room)}", {}, token=dave.token)
    dave_join = await until(lambda: [e for e in net.site_events("civic.membership.changed")
                                     if e["data"]["state"] == "joined" and e["data"]["member"]["id"] != carol_at_site],
                            what="dave's join")
    await s.send([s.event("civic.membership.changed", "g-site", {
        "member": {"id": dave_join[0]["data"]["member"]["id"]}, "state": "banned", "by": {"id": "mod"},
        "reason": "harassment"})])
    banned = await until(lambda: _membership_is(net, dave.user_id, "ban"), what="dave banned in the room")
    assert banned["reason"] == "harassment"


async def _ghost_members(net: Net, n: int) -> dict[str, str]:
    done = await net.call("GET", f"/_matrix/client/v3/rooms/{_q(net.room)}/joined_members", token=net.hub.alice.token)
    ghosts = {u: (v.get("display_name") or "") for u, v in done["joined"].items() if u.startswith("@civic_")}
    return ghosts if len(ghosts) >= n else {}


def _site_states(net: Net, want: set[str]) -> dict[str, dict[str, Any]]:
    found = {e["data"]["state"]: e["data"] for e in net.site_events("civic.membership.changed")}
    return found if want <= set(found) else {}


async def _membership_is(net: Net, user: str, membership: str) -> dict[str, Any] | None:
    m = await net.member(user)
    return m if m and m.get("membership") == membership else None


async def test_a_moderator_redaction_arrives_as_a_moderation_removal(net: Net) -> None:
    hub, alice = net.hub, net.hub.alice
    mona = await asyncio.to_thread(hub.synapse.register_user, f"mona{secrets.token_hex(3)}")
    await net.call("POST", f"/_matrix/client/v3/rooms/{_q(net.room)}/invite", {"user_id": mona.user_id},
                   token=alice.token)
    await net.call("POST", f"/_matrix/client/v3/join/{_q(net.room)}", {}, token=mona.token)
    levels = await net.call("GET", f"/_matrix/client/v3/rooms/{_q(net.room)}/state/m.room.power_levels",
                            token=alice.token)
    levels["users"][mona.user_id] = 50
    await net.call("PUT", f"/_matrix/client/v3/rooms/{_q(net.room)}/state/m.room.power_levels/", levels,
                   token=alice.token)
    role = await until(lambda: [e["data"] for e in net.site_events("civic.membership.changed")
                                if e["data"]["state"] == "role_changed"], what="mona's role at the site")
    assert role[0]["role"] == "moderator"

    bad = await net.send(alice, {"msgtype": "m.text", "body": "something against the rules"})
    gw_id = (await until(lambda: net.site_events("civic.message.created"), what="message"))[0]["data"]["id"]
    await net.call("PUT", f"/_matrix/client/v3/rooms/{_q(net.room)}/redact/{_q(bad)}/m1",
                   {"reason": "breaks rule 3"}, token=mona.token)
    action = (await until(lambda: net.site_events("civic.moderation.action"), what="the removal"))[0]["data"]
    assert action["action"] == "remove_message" and action["message"] == net.site.own_ids[gw_id]
    assert action["reason"] == "breaks rule 3" and action["by"]["id"] != mona.user_id
    assert not net.site_events("civic.message.deleted")
    log = await _moderation_log(net)
    assert any(e["action"] == "remove_message" and e["reason"] == "breaks rule 3" for e in log)


async def _moderation_log(net: Net) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{net.hub.port}/v1/moderation-log") as r:
            body = await r.json()
    return body["entries"] if isinstance(body, dict) else body


# -- policy lists -------------------------------------------------------------------------------------

async def test_a_policy_list_ban_stops_that_users_messages(hub: Hub, tmp_path: Path) -> None:
    alice = hub.alice
    policy = await new_room(hub, alice)
    await asyncio.to_thread(hub.synapse.call, "PUT", f"/_matrix/client/v3/rooms/{_q(policy)}/state/"
                            f"m.policy.rule.user/rule1", {"entity": "@spam*:" + SERVER, "recommendation": "m.ban",
                                                          "reason": "known spammer"}, token=alice.token)
    spammer = await asyncio.to_thread(hub.synapse.register_user, f"spammer{secrets.token_hex(3)}")
    async with linked(hub, tmp_path, policy_room=policy) as net:
        gw, room, sender = net.gw, net.room, net.sender
        await until(lambda: gw.metrics.render().find(b'civic_ban_rules{platform="hub"} 1.0') >= 0,
                    what="the rule imported")
        await net.call("POST", f"/_matrix/client/v3/rooms/{_q(room)}/invite", {"user_id": spammer.user_id},
                       token=alice.token)
        await net.call("POST", f"/_matrix/client/v3/join/{_q(room)}", {}, token=spammer.token)
        await net.send(spammer, {"msgtype": "m.text", "body": "buy now"})
        await net.send(alice, {"msgtype": "m.text", "body": "a real message"})
        await until(lambda: net.site_events("civic.message.created"), what="alice's message")
        await asyncio.sleep(0.5)
        texts = [e["data"]["text"] for e in net.site_events("civic.message.created")]
        assert texts == ["a real message"]
        # the site's own people are held to the same rules: a server rule on a site id
        await asyncio.to_thread(hub.synapse.call, "PUT", f"/_matrix/client/v3/rooms/{_q(policy)}/state/"
                                f"m.policy.rule.server/rule2", {"entity": "evil.example", "recommendation": "m.ban"},
                                token=alice.token)
        await until(lambda: gw.metrics.render().find(b'civic_ban_rules{platform="hub"} 2.0') >= 0,
                    what="the server rule imported")
        await sender.send([sender.event("civic.message.created", "g-site",
                                        site_msg("x-1", "from the evil server", author="mallory@evil.example"))])
        await sender.send([sender.event("civic.message.created", "g-site", site_msg("x-2", "from a neighbour"))])

        async def site_texts() -> list[str]:
            return [e["content"]["body"] for e in by_type(await net.events(alice), "m.room.message")
                    if e["sender"].startswith("@civic_")]
        assert await until(site_texts, what="the neighbour's message") == ["from a neighbour"]
        dropped = gw.metrics.render().decode()
        # the spammer's join and message
        assert 'civic_dropped_total{platform="hub",reason="policy_ban"} 2.0' in dropped
        assert 'civic_dropped_total{platform="site",reason="policy_ban"} 1.0' in dropped


# -- the appservice's guard ---------------------------------------------------------------------------

async def test_a_replayed_transaction_changes_nothing_and_a_wrong_token_stores_nothing(net: Net) -> None:
    alice = net.hub.alice
    await net.send(alice, {"msgtype": "m.text", "body": "only once"})
    await until(lambda: net.site_events("civic.message.created"), what="message")
    events = [e for e in await net.events(alice) if e["type"] == "m.room.message"]
    url = f"http://127.0.0.1:{net.hub.port}{PREFIX}/_matrix/app/v1/transactions/"
    forged = {"events": [dict(events[-1], event_id="$forged" + secrets.token_hex(6),
                              content={"msgtype": "m.text", "body": "forged"})]}
    async with aiohttp.ClientSession() as s:
        for txn, body in (("replay-1", {"events": events}), ("replay-1", {"events": events})):
            async with s.put(url + txn, json=body,
                             headers={"Authorization": f"Bearer {net.hub.config.hs_token}"}) as r:
                assert r.status == 200
        async with s.put(url + "forged-1", json=forged, headers={"Authorization": "Bearer wrong-token"}) as r:
            assert r.status == 403 and (await r.json())["errcode"] == "M_FORBIDDEN"
        async with s.put(url + "forged-2", json=forged) as r:
            assert r.status == 401
    await asyncio.sleep(1.0)
    assert [e["data"]["text"] for e in net.site_events("civic.message.created")] == ["only once"]
    assert len(net.site.events) == 1
    metrics = net.gw.metrics.render().decode()
    assert 'civic_matrix_transaction_replays_total{platform="hub"} 1.0' in metrics
    assert 'civic_dropped_total{platform="hub",reason="duplicate"}' in metrics


# -- attachments ------------------------------------------------------------------------------------

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d49444154789c6360f8cfc0f01f0005000201f2e7c1d20000000049454e44ae426082")


async def test_attachments_are_copied_into_matrix_and_served_out_of_it(hub: Hub, tmp_path: Path) -> None:
    async def pic(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 8192, content_type="application/pdf")

    files = web.Application()
    files.router.add_get("/pic.png", pic)
    files.router.add_get("/big.bin", big)
    runner = web.AppRunner(files)
    await runner.setup()
    files_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", files_port).start()
    alice = hub.alice
    try:
        async with linked(hub, tmp_path, media_max_bytes=4096) as net:
            s = net.sender
            await s.send([s.event("civic.message.created", "g-site", site_msg("p-1", "our poster", attachments=[
                {"url": f"http://127.0.0.1:{files_port}/pic.png", "media_type": "image/png", "alt": "a poster",
                 "name": "pic.png"},
                {"url": f"http://127.0.0.1:{files_port}/big.bin", "media_type": "application/pdf",
                 "name": "minutes.pdf"}]))])

            async def ghost_events() -> list[dict[str, Any]]:
                got = [e for e in by_type(await net.events(alice), "m.room.message") if e["sender"].startswith("@civic_")]
                return got if len(got) == 2 else []
            text, image = await until(ghost_events, what="the text and the image in the room")
            # too large to copy: a link in the text; the image: uploaded, with its alt text
            assert text["content"]["body"] == f"our poster\n\nminutes.pdf: http://127.0.0.1:{files_port}/big.bin"
            assert image["content"]["msgtype"] == "m.image" and image["content"]["body"] == "a poster"
            assert 'civic_degraded_total{reason="matrix_media_not_copied"} 1.0' in net.gw.metrics.render().decode()
            mxc = image["content"]["url"]
            server, media_id = mxc.removeprefix("mxc://").split("/")
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{hub.config.homeserver}/_matrix/client/v1/media/download/{server}/{media_id}",
                                    headers={"Authorization": f"Bearer {alice.token}"}) as r:
                    assert r.status == 200 and await r.read() == PNG

                # Alice's file goes out as a signed gateway link that serves the bytes
                async with http.post(f"{hub.config.homeserver}/_matrix/media/v3/upload?filename=notes.txt",
                                     data=b"meeting notes", headers={"Authorization": f"Bearer {alice.token}",
                                                                     "Content-Type": "text/plain"}) as r:
                    uploaded = (await r.json())["content_uri"]
                await net.send(alice, {"msgtype": "m.file", "body": "notes.txt", "url": uploaded,
                                       "info": {"mimetype": "text/plain", "size": 13}})
                got = (await until(lambda: net.site_events("civic.message.created"), what="the file at the site"))
                att = got[0]["data"]["attachments"][0]
                assert att["name"] == "notes.txt" and att["media_type"] == "text/plain"
                assert att["url"].startswith(hub.config.appservice_url + "/media/") and "mxc:" not in att["url"]
                async with http.get(att["url"]) as r:
                    assert r.status == 200 and await r.read() == b"meeting notes"
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
                async with http.get(att["url"][:-4] + "0000") as r:  # a forged signature
                    assert r.status == 403
                other = att["url"].replace(uploaded.rsplit("/", 1)[1], media_id)  # another file, same signature
                async with http.get(other) as r:
                    assert r.status == 403
    finally:
        await runner.cleanup()


async def test_the_bot_declines_invites_to_rooms_no_link_names(net: Net) -> None:
    alice = net.hub.alice
    stray = await asyncio.to_thread(net.hs.create_room, alice.token, invite=[net.hub.bot])

    async def bot_membership() -> str | None:
        r = await asyncio.to_thread(net.hs.request, "GET", f"/_matrix/client/v3/rooms/{_q(stray)}/state/"
                                    f"m.room.member/{_q(net.hub.bot)}", token=alice.token)
        return r.body.get("membership") if r.status == 200 else None
    assert await until(lambda: _is(bot_membership, "leave"), what="the invite declined") is True
    await net.send(alice, {"msgtype": "m.text", "body": "not linked"}, room=stray)
    await net.send(alice, {"msgtype": "m.text", "body": "linked"})
    await until(lambda: net.site_events("civic.message.created"), what="the linked room's message")
    assert [e["data"]["text"] for e in net.site_events("civic.message.created")] == ["linked"]


async def _is(fn: Callable[[], Any], value: Any) -> bool:
    return await fn() == value


async def test_leaves_travel_both_ways(net: Net) -> None:
    hub, alice, s = net.hub, net.hub.alice, net.sender
    erin = await asyncio.to_thread(hub.synapse.register_user, f"erin{secrets.token_hex(3)}")
    await net.call("POST", f"/_matrix/client/v3/rooms/{_q(net.room)}/invite", {"user_id": erin.user_id},
                   token=alice.token)
    await net.call("POST", f"/_matrix/client/v3/join/{_q(net.room)}", {}, token=erin.token)
    await net.call("POST", f"/_matrix/client/v3/rooms/{_q(net.room)}/leave", {}, token=erin.token)
    left = await until(lambda: [e["data"] for e in net.site_events("civic.membership.changed")
                                if e["data"]["state"] == "left"], what="erin's leave at the site")
    assert left[0].get("by") is None  # she left by herself: not a kick

    await s.send([s.event("civic.membership.changed", "g-site", {"member": {"id": "finn", "name": "Finn"},
                                                                 "state": "joined"})])
    ghost = next(iter(await until(lambda: _ghost_members(net, 1), what="finn's ghost joined")))
    await s.send([s.event("civic.membership.changed", "g-site", {"member": {"id": "finn"}, "state": "left"})])
    await until(lambda: _membership_is(net, ghost, "leave"), what="finn's ghost left")
    # the ghost's own leave is an echo, not a new event for the site
    await asyncio.sleep(0.5)
    assert len([e for e in net.site_events("civic.membership.changed") if e["data"]["state"] == "left"]) == 1
