"""The ActivityPub adapter end to end: a real Fedify peer (Persons alice, bob,
carol), the gateway in this process hosting the group "club", linked to a
webhook site. Fedify's blocking helpers run in threads, so the gateway keeps
answering Fedify (which fetches keys and documents from it) meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from adapters.activitypub import signatures as sig
from gateway.runtime import Gateway
from gateway.config import parse
from tests.fedify import Fedify, ensure_fedify_shown
from tests.services import free_port
from tests.sitekit import Sender, Site, new_secret, wait_for


@pytest.fixture(scope="module")
def fedify(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Fedify]:
    ensure_fedify_shown(pytestconfig)
    with Fedify(tmp_path_factory.mktemp("fedify"), persons=("alice", "bob", "carol")) as peer:
        yield peer


@dataclass
class Net:
    gw: Gateway
    base: str
    site: Site
    sender: Sender
    fedify: Fedify

    @property
    def group(self) -> str:
        return f"{self.base}/ap/groups/club"

    async def f(self, method: str, *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(getattr(self.fedify, method), *args, **kw)

    def site_events(self, etype: str) -> list[dict[str, Any]]:
        return self.site.of_type(etype)


@contextlib.asynccontextmanager
async def linked(fedify: Fedify, tmp_path: Path, group: str, extra: str = "") -> AsyncIterator[Net]:
    """A gateway (in this process) with an ActivityPub platform whose ``group``
    (a hosted name or a remote actor URL) is linked to a fresh webhook site."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    site = Site("site", new_secret(), prefix="s-")
    await site.start()
    text = (f'[gateway]\nlisten = "127.0.0.1:{port}"\ndatabase = "{tmp_path}/gw.db"\nlog_format = "text"\n'
            f'retry_max_delay = 0.5\n[platforms.fedi]\nkind = "activitypub"\nbase_url = "{base}"\n'
            f'allow_private_addresses = true\n{extra}' + site.config(batch_max=1)
            + f'[[links]]\nname = "l"\ngroups = [{{platform = "fedi", group = "{group}"}}, '
              f'{{platform = "site", group = "g"}}]\n')
    gw = Gateway(parse(text, "test.toml"))
    await gw.start()
    await gw.serve("127.0.0.1", port)
    sender = Sender(base, "site", site.secret)
    await asyncio.to_thread(fedify.clear_log)
    try:
        yield Net(gw, base, site, sender, fedify)
    finally:
        await sender.close()
        if gw._runner is not None:
            await gw._runner.cleanup()
        await gw.stop()
        await site.stop()


@pytest.fixture
async def net(fedify: Fedify, tmp_path: Path) -> AsyncIterator[Net]:
    async with linked(fedify, tmp_path, "club", '[platforms.fedi.groups.club]\nname = "The Club"\n') as n:
        yield n


async def join(net: Net, *people: str) -> None:
    for who in people:
        await net.f("follow", who, net.group)
    await wait_for(lambda: len([e for e in net.site_events("civic.membership.changed")
                                if e["data"]["state"] == "joined"]) >= len(people), timeout=15, what="joins at the site")


async def test_the_group_is_discoverable_and_counts_nothing(net: Net) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{net.base}/.well-known/webfinger",
                         params={"resource": f"acct:club@127.0.0.1:{net.base.rsplit(':', 1)[1]}"}) as r:
            assert r.status == 200 and (await r.json(content_type=None))["links"][0]["href"] == net.group
        async with s.get(net.group, headers={"Accept": "application/activity+json"}) as r:
            actor = await r.json(content_type=None)
            assert r.content_type == "application/activity+json"
            assert actor["type"] == "Group" and actor["name"] == "The Club"
            assert actor["publicKey"]["owner"] == net.group and "BEGIN PUBLIC KEY" in actor["publicKey"]["publicKeyPem"]
        async with s.get(actor["followers"]) as r:
            assert "totalItems" not in await r.json(content_type=None)
        async with s.get(f"{net.base}/nodeinfo/2.1") as r:
            info = await r.json()
            assert info["protocols"] == ["activitypub"] and info["usage"] == {"users": {}}
    looked = await net.f("lookup", net.group)  # Fedify itself can read the group
    assert looked["type"] == "Group"


async def test_fediverse_people_join_and_post_and_the_group_announces(net: Net) -> None:
    await join(net, "alice", "bob")
    following = await net.f("following", "alice")
    assert any(f["target"] == net.group and f["accepted"] for f in following)
    joined = {e["data"]["member"]["name"] for e in net.site_events("civic.membership.changed")}
    assert joined == {"alice (fedify peer)", "bob (fedify peer)"}  # their names; their ids are stand-ins

    note = await net.f("note", "alice", "<p>Hello <b>club</b></p>", to=["Public", net.group],
                       summary="about health", sensitive=True)
    got = (await _until(lambda: net.site_events("civic.message.created"), "alice's note at the site"))[0]["data"]
    assert got["text"] == "Hello club" and got["html"] == "<p>Hello <b>club</b></p>"
    assert got["warning"] == "about health" and got["sensitive"] is True
    site_id = net.site.own_ids[got["id"]]

    # bob gets it from the group, as an Announce of alice's Create
    entry = await asyncio.to_thread(net.fedify.wait_for, "bob", "Announce",
                                    lambda e: note["id"] in orjson.dumps(e["activity"]).decode(), timeout=15)
    assert entry["verified"] and entry["sender"] == net.group

    # the site replies: alice gets the group's Announce of a Create by the site person's Person actor
    await net.sender.send([net.sender.event("civic.message.created", "g", {
        "id": "r-1", "author": {"id": "dirk", "name": "Dirk"}, "text": "welcome!", "reply_to": site_id,
        "warning": "mild"})])
    entry = await asyncio.to_thread(net.fedify.wait_for, "alice", "Announce",
                                    lambda e: "welcome!" in orjson.dumps(e["activity"]).decode(), timeout=15)
    inner = entry["activity"]["object"]
    obj = inner["object"]
    assert entry["verified"] and inner["type"] == "Create" and obj["inReplyTo"] == note["id"]
    assert obj["summary"] == "mild" and obj["sensitive"] is True
    person = await net.f("lookup", obj["attributedTo"])
    assert person["type"] == "Person" and person["name"] == "Dirk"

    # alice answers the site's message: a reply with the site's own id
    await net.f("note", "alice", "<p>thanks</p>", to=["Public", net.group], inReplyTo=obj["id"])
    replies = await _until(lambda: [e["data"] for e in net.site_events("civic.message.created")
                                    if e["data"].get("reply_to")], "alice's reply")
    assert replies[0]["reply_to"] == "r-1" and replies[0]["text"] == "thanks"

    # alice likes it, edits and deletes her own note: each reaches the site with the site's ids
    await net.f("like", "alice", obj["id"], to=[net.group])
    reaction = (await _until(lambda: net.site_events("civic.reaction.added"), "the like"))[0]["data"]
    assert reaction["message"] == "r-1" and reaction["key"] == "👍"  # the site's own id of its message
    await net.f("update", "alice", note["id"], "<p>Hello club, edited</p>")
    edit = (await _until(lambda: net.site_events("civic.message.edited"), "the edit"))[0]["data"]
    assert edit["id"] == site_id and edit["text"] == "Hello club, edited"
    await net.f("delete", "alice", note["id"])
    deleted = (await _until(lambda: net.site_events("civic.message.deleted"), "the deletion"))[0]["data"]
    assert deleted["id"] == site_id


async def test_a_flag_and_a_move_arrive(net: Net) -> None:
    await join(net, "alice")
    note = await net.f("note", "alice", "<p>report me</p>", to=["Public", net.group])
    await _until(lambda: net.site_events("civic.message.created"), "the note")
    await net.f("flag", "bob", [net.fedify.actor_url("alice"), note["id"]], "spam", to=[net.group])
    report = (await _until(lambda: net.site_events("civic.report.filed"), "the report"))[0]["data"]
    assert report["text"] == "spam" and report["message"] == net.site.own_ids[
        net.site_events("civic.message.created")[0]["data"]["id"]]

    await net.f("also_known_as", "carol", [net.fedify.actor_url("alice")])
    await net.f("move", "alice", net.fedify.actor_url("carol"), to=[net.group])
    moved = (await _until(lambda: net.site_events("civic.account.moved"), "the move"))[0]["data"]
    assert moved["target"]["id"] == net.fedify.actor_url("carol") and moved["target"]["platform"] == "fedi"


async def test_the_gateways_own_people_and_groups_resolve_to_the_sites_own_ids(net: Net) -> None:
    """A Mention or a Flag naming a site person's ``Person`` actor reaches the
    site as that site's own user (not a new stand-in for a URL); a Flag of
    the hosted group reaches it as a report about its own group."""
    await join(net, "alice")
    await net.sender.send([net.sender.event("civic.message.created", "g", {
        "id": "d-1", "author": {"id": "dirk", "name": "Dirk"}, "text": "hello from the site"})])
    entry = await asyncio.to_thread(net.fedify.wait_for, "alice", "Announce",
                                    lambda e: "hello from the site" in orjson.dumps(e["activity"]).decode(), timeout=15)
    dirk = entry["activity"]["object"]["object"]["attributedTo"]  # the gateway's Person actor for the site's dirk
    assert dirk.startswith(f"{net.base}/ap/people/")

    await net.f("note", "alice", "<p>thanks, Dirk</p>", to=["Public", net.group], mentions=[dirk])
    got = (await _until(lambda: net.site_events("civic.message.created"), "alice's mention"))[0]["data"]
    assert [m["id"] for m in got["mentions"]] == ["dirk"]  # the site's own user

    # Mastodon's way: from the instance actor, to the reported account's own inbox, account first
    await net.f("flag", "bob", [dirk], "<p>rude</p>", to=[dirk])
    report = (await _until(lambda: net.site_events("civic.report.filed"), "the report of dirk"))[0]
    assert report["subject"] == "g" and report["data"]["member"]["id"] == "dirk" and report["data"]["text"] == "rude"
    assert "message" not in report["data"]

    await net.f("flag", "bob", [net.group], "the whole group is spam", to=[net.group])
    reports = await _until(lambda: [e for e in net.site_events("civic.report.filed")
                                    if e["data"].get("text") == "the whole group is spam"], "the report of the group")
    assert reports[0]["subject"] == "g" and "member" not in reports[0]["data"] and "message" not in reports[0]["data"]


# -- the inbox refuses before anything is stored -------------------------------------------------------

class Impostor:
    """An actor of our own on a local server, to sign requests Fedify would never send."""

    def __init__(self) -> None:
        from aiohttp import web

        self.key = sig.generate_rsa_key()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/users/mallory"
        self.app = web.Application()

        async def actor(request: web.Request) -> web.Response:
            return web.Response(body=orjson.dumps({
                "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1"],
                "id": self.url, "type": "Person", "inbox": self.url + "/inbox", "preferredUsername": "mallory",
                "publicKey": {"id": self.url + "#main-key", "owner": self.url,
                              "publicKeyPem": sig.public_key_pem(self.key)}}), content_type="application/activity+json")
        self.received: list[dict[str, Any]] = []

        async def inbox(request: web.Request) -> web.Response:
            self.received.append(orjson.loads(await request.read()))
            return web.Response(status=202)
        self.app.router.add_get("/users/mallory", actor)
        self.app.router.add_post("/users/mallory/inbox", inbox)
        self.runner = web.AppRunner(self.app)

    async def __aenter__(self) -> "Impostor":
        from aiohttp import web

        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    def signed(self, url: str, body: bytes, key_id: str | None = None, now: float | None = None) -> dict[str, str]:
        headers = {"Content-Type": "application/activity+json"}
        headers.update(sig.sign_cavage("POST", url, headers, body, key_id or self.url + "#main-key", self.key,
                                       now or time.time()))
        return headers


@pytest.mark.parametrize("which", ["group", "instance"])
async def test_unsigned_forged_replayed_tampered_and_spoofed_activities_are_refused(net: Net, which: str) -> None:
    """At a hosted group's inbox, and at the instance actor's inbox (where a
    joined group's announcements arrive): the same checks."""
    inbox = f"{net.group}/inbox" if which == "group" else f"{net.base}/ap/actor/inbox"

    def create(actor: str, oid: str, text: str, act_id: str | None = None) -> bytes:
        return orjson.dumps({"@context": "https://www.w3.org/ns/activitystreams", "id": act_id or oid + "#create",
                             "type": "Create", "actor": actor, "to": ["https://www.w3.org/ns/activitystreams#Public",
                                                                      net.group],
                             "object": {"id": oid, "type": "Note", "attributedTo": actor, "content": text,
                                        "to": ["https://www.w3.org/ns/activitystreams#Public", net.group]}})

    async with Impostor() as evil, aiohttp.ClientSession() as s:
        async def post(body: bytes, headers: dict[str, str]) -> tuple[int, str]:
            async with s.post(inbox, data=body, headers=headers) as r:
                return r.status, (await r.json(content_type=None)).get("reason", "")

        deep = b'{"a":' * 100 + b"1" + b"}" * 100
        assert await post(deep, evil.signed(inbox, deep)) == (400, "bad_json")
        huge = b'{"pad":"' + b"x" * (1024 * 1024) + b'"}'
        assert (await post(huge, evil.signed(inbox, huge)))[0] == 413
        # unsigned: refused from its headers, before its size matters
        assert await post(huge, {"Content-Type": "application/activity+json"}) == (401, "unsigned")
        mine = create(evil.url, evil.url.replace("/users/mallory", "/notes/1"), "mine")
        ok = evil.signed(inbox, mine)
        assert await post(mine, ok) == (202, "")
        assert await post(mine, ok) == (401, "replayed")
        assert (await post(mine, {"Content-Type": "application/activity+json"}))[0] == 401
        tampered = mine.replace(b"mine", b"evil")
        assert await post(tampered, {**evil.signed(inbox, mine), "Digest": evil.signed(inbox, mine)["Digest"]}) \
            == (401, "bad_digest")
        old = evil.signed(inbox, create(evil.url, evil.url.replace("mallory", "n2"), "old"), now=time.time() - 7200)
        assert (await post(create(evil.url, evil.url.replace("mallory", "n2"), "old"), old)) == (401, "expired")
        # signed by mallory, claiming to be alice: the signer is not the actor
        alice = net.fedify.actor_url("alice")
        spoof = create(alice, alice + "/notes/spoof", "I am alice")
        assert await post(spoof, evil.signed(inbox, spoof)) == (401, "signer_not_actor")
        # mallory's own activity about an object on alice's server
        foreign = create(evil.url, alice + "/notes/x", "not mine", act_id=evil.url + "/activities/1")
        assert await post(foreign, evil.signed(inbox, foreign)) == (403, "foreign_object")
        # a keyId pointing at alice's key, with mallory's signature
        forged = create(alice, alice + "/notes/f", "forged")
        assert (await post(forged, evil.signed(inbox, forged, key_id=alice + "#main-key")))[0] == 401

    await asyncio.sleep(0.5)
    texts = [e["data"]["text"] for e in net.site_events("civic.message.created")]
    assert texts == ["mine"]  # only the one genuine activity, once
    metrics = net.gw.metrics.render().decode()
    for reason in ("replayed", "unsigned", "bad_digest", "expired", "signer_not_actor", "foreign_object"):
        assert f'reason="{reason}"' in metrics, reason


async def _until(fn: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- the gateway as a member of a group hosted elsewhere -----------------------------------------------

@pytest.fixture
async def joined(fedify: Fedify, tmp_path: Path) -> AsyncIterator[Net]:
    async with linked(fedify, tmp_path, fedify.group_url("club")) as n:
        yield n


async def test_the_gateway_joins_a_remote_group_and_takes_part_both_ways(joined: Net) -> None:
    net, club = joined, joined.fedify.group_url("club")
    instance = f"{net.base}/ap/actor"
    await _until(lambda: instance in net.fedify.followers("club"), "the gateway following the club")
    await net.f("follow", "alice", club)

    note = await net.f("note", "alice", "<p>From the club</p>", to=["Public", club], summary="long read",
                       audience=club)
    got = (await _until(lambda: net.site_events("civic.message.created"), "the club's post at the site"))[0]["data"]
    assert got["text"] == "From the club" and got["warning"] == "long read"
    assert got["author"]["name"] == "alice (fedify peer)"

    status, _ = await net.sender.send([net.sender.event("civic.message.created", "g", {
        "id": "erik-1", "author": {"id": "erik", "name": "Erik"}, "text": "hello from the site",
        "reply_to": net.site.own_ids[got["id"]], "warning": "spoilers"})])
    assert status == 202
    entry = await asyncio.to_thread(net.fedify.wait_for, "alice", "Announce",
                                    lambda e: "hello from the site" in orjson.dumps(e["activity"]).decode(),
                                    timeout=15)
    inner = entry["activity"]["object"]
    assert entry["verified"] and entry["sender"] == club
    assert inner["type"] == "Create" and inner["object"]["inReplyTo"] == note["id"]
    assert inner["object"]["summary"] == "spoilers" and inner["actor"].startswith(net.base + "/ap/people/")
    # the club shared the gateway's post back with the gateway too: not taken in again
    await asyncio.sleep(0.5)
    assert [e["data"]["text"] for e in net.site_events("civic.message.created")] == ["From the club"]

    # alice's like of the site's post, her edit and her deletion come through the club
    site_first = net.site.own_ids[got["id"]]
    await net.f("like", "alice", inner["object"]["id"], to=[club], audience=club)
    like = (await _until(lambda: net.site_events("civic.reaction.added"), "the like via the club"))[0]["data"]
    assert like["message"] == "erik-1"
    await net.f("update", "alice", note["id"], "<p>From the club, edited</p>")
    edit = (await _until(lambda: net.site_events("civic.message.edited"), "the edit via the club"))[0]["data"]
    assert edit["id"] == site_first and edit["text"] == "From the club, edited"
    await net.f("delete", "alice", note["id"])
    gone = (await _until(lambda: net.site_events("civic.message.deleted"), "the deletion via the club"))[0]["data"]
    assert gone["id"] == site_first


async def test_what_a_joined_group_announces_is_checked_at_its_origin(fedify: Fedify, tmp_path: Path) -> None:
    """A group the gateway joined (here one of our own making, so that it can
    lie) announces a Create by alice of a note alice's server does not have,
    and one whose note lives on a third host: both refused, nothing stored."""
    async with Impostor() as evil:
        group_url = evil.url  # mallory plays a group the gateway joins
        follows = evil.received
        async with linked(fedify, tmp_path, group_url) as net:
            await wait_for(lambda: any(f.get("type") == "Follow" for f in follows), timeout=10,
                           what="the gateway's Follow")
            alice = fedify.actor_url("alice")
            inbox_url = f"{net.base}/ap/actor/inbox"
            async with aiohttp.ClientSession() as s:
                async def announce(inner: dict[str, Any], n: int) -> tuple[int, str]:
                    body = orjson.dumps({"@context": "https://www.w3.org/ns/activitystreams", "type": "Announce",
                                         "id": f"{group_url}/announces/{n}", "actor": group_url, "object": inner})
                    async with s.post(inbox_url, data=body, headers=evil.signed(inbox_url, body)) as r:
                        return r.status, (await r.json(content_type=None)).get("reason", "")

                missing = {"id": alice + "/notes/nope#create", "type": "Create", "actor": alice,
                           "object": {"id": alice + "/notes/nope", "type": "Note", "attributedTo": alice,
                                      "content": "never written", "to": [group_url]}}
                assert await announce(missing, 1) == (403, "unverifiable")
                third = {"id": alice + "/notes/x#create", "type": "Create", "actor": alice,
                         "object": {"id": "http://elsewhere.example/notes/1", "type": "Note",
                                    "attributedTo": alice, "content": "hosted elsewhere", "to": [group_url]}}
                assert await announce(third, 2) == (403, "foreign_object")
            await asyncio.sleep(0.3)
            assert net.site.events == []


async def test_a_person_the_gateway_may_not_carry_is_refused_membership(net: Net) -> None:
    from gateway.adapter import BanRule

    carol = net.fedify.actor_url("carol")
    net.gw.set_ban_rules("site", [BanRule(kind="user", glob=carol, reason="test")])
    await net.f("follow", "carol", net.group)
    entry = await asyncio.to_thread(net.fedify.wait_for, "carol", "Reject", timeout=15)
    assert entry["verified"] and entry["sender"] == net.group
    await net.f("note", "carol", "<p>let me in</p>", to=["Public", net.group])
    await asyncio.sleep(0.5)
    assert net.site.events == []  # neither her follow nor her post crossed
    assert all(k != f"follower:club:{carol}" for k, _ in await net.gw.adapters["fedi"].ctx.state.scan("follower:"))


async def test_a_new_name_reaches_the_followers_as_an_update(net: Net) -> None:
    await join(net, "alice")
    s = net.sender
    await s.send([s.event("civic.message.created", "g", {"id": "d-1", "author": {"id": "dirk", "name": "Dirk"},
                                                         "text": "hi"})])
    await asyncio.to_thread(net.fedify.wait_for, "alice", "Announce", timeout=15)
    await s.send([s.event("civic.profile.updated", "g", {"actor": {"id": "dirk", "name": "Dirk B."}})])
    entry = await asyncio.to_thread(
        net.fedify.wait_for, "alice", "Announce",
        lambda e: (e["activity"].get("object") or {}).get("type") == "Update", timeout=15)
    person = entry["activity"]["object"]["object"]
    assert person["type"] == "Person" and person["name"] == "Dirk B."
    assert person["id"] == entry["activity"]["object"]["actor"]  # the same Person that posted before
