"""The real-Fedify test harness (tests/fedify.py, tests/fedify_peer/peer.mjs).

One Fedify peer for the module (Persons alice, bob, carol; the Group club):
everything goes through Fedify's own signing, delivery, verification and
inbox routing, peer to itself over 127.0.0.1. A FEP-1b12 group announces a
member's post to its followers; a direct note keeps its content warning; a
Like and its Undo arrive; Update, Delete, EmojiReact, Flag and Move arrive
as sent; and an unsigned or badly signed POST to an inbox is refused."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fedify import PUBLIC, Fedify, FedifyError, as_list, ensure_fedify_shown


@pytest.fixture(scope="module")
def peer(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fedify]:
    ensure_fedify_shown(pytestconfig)
    workdir = tmp_path_factory.mktemp("fedify")
    started = time.monotonic()
    with Fedify(workdir) as fedify:
        print(f"[fedify] peer up on {fedify.url} in {time.monotonic() - started:.2f} s; log {fedify.log_path}")
        yield fedify
        assert fedify.errors() == [], fedify.log_tail()


@pytest.fixture(scope="module")
def club(peer: Fedify) -> str:
    """alice and bob follow the group; both Follows accepted."""
    group = peer.group_url("club")
    for name in ("alice", "bob"):
        follow = peer.follow(name, group)
        accept = peer.wait_for(name, "Accept", lambda e, f=follow: _id(e["activity"]["object"]) == f["id"])
        assert accept["sender"] == group and accept["verified"] is True
    assert sorted(peer.followers("club")) == [peer.actor_url("alice"), peer.actor_url("bob")]
    assert all(f["accepted"] for f in peer.following("alice"))
    return group


def _id(value: Any) -> Any:
    return value.get("id") if isinstance(value, dict) else value


def _verified(entry: dict[str, Any], sender: str) -> None:
    assert entry["verified"] is True
    assert entry["sender"] == sender
    assert entry["signature"]["scheme"] in ("rfc9421", "draft-cavage")
    assert entry["signature"]["keyId"] == f"{sender}#main-key"


# -- actors ---------------------------------------------------------------------------------
def test_actors_are_served_with_keys_inboxes_and_types(peer: Fedify) -> None:
    status, alice = peer.get_ap(peer.actor_url("alice"))
    assert status == 200 and alice["type"] == "Person"
    assert alice["inbox"] == peer.inbox_url("alice")
    assert alice["endpoints"]["sharedInbox"] == peer.inbox_url()
    assert alice["followers"] == peer.followers_url("alice")
    assert alice["publicKey"]["id"] == f"{alice['id']}#main-key"
    assert alice["publicKey"]["publicKeyPem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert len(as_list(alice["assertionMethod"])) == 2  # RSA and Ed25519 Multikeys
    status, group = peer.get_ap(peer.group_url("club"))
    assert status == 200 and group["type"] == "Group"
    assert peer.get_ap("/users/nobody")[0] == 404
    assert peer.lookup(peer.actor_url("bob"))["type"] == "Person"


# -- FEP-1b12 group -------------------------------------------------------------------------
def test_a_group_announces_a_followers_post_to_its_followers(peer: Fedify, club: str) -> None:
    bob = peer.actor_url("bob")
    sent = peer.note("bob", "<p>Litter pick on Saturday</p>", to=[club], cc=[PUBLIC], audience=club)
    assert sent["delivered_to"] == [peer.inbox_url("club")]
    received = peer.wait_for("club", "Create", lambda e: e["id"] == sent["create"])
    _verified(received, bob)
    assert received["group"] == {"group": "club", "announced": received["group"]["announced"], "why": None}

    entry = peer.wait_for("alice", "Announce", lambda e: _id(e["activity"]["object"]) == sent["create"])
    _verified(entry, club)
    announce = entry["activity"]
    assert announce["id"] == received["group"]["announced"]
    assert announce["actor"] == club
    inner = announce["object"]  # the activity, embedded
    assert inner["type"] == "Create" and inner["actor"] == bob
    assert inner["object"]["id"] == sent["id"]
    assert inner["object"]["content"] == "<p>Litter pick on Saturday</p>"
    assert inner["object"]["attributedTo"] == bob
    assert club in as_list(inner["object"]["to"])
    assert peer.followers_url("club") in as_list(announce.get("cc"))
    # the author, a follower too, gets the announce as well
    peer.wait_for("bob", "Announce", lambda e: _id(e["activity"]["object"]) == sent["create"])


def test_a_group_announces_likes_and_reactions_but_not_from_strangers(peer: Fedify, club: str) -> None:
    post = peer.note("alice", "<p>Who comes?</p>", to=[club], audience=club)
    like = peer.like("bob", post["id"], to=[club], audience=club)
    entry = peer.wait_for("alice", "Announce", lambda e: _id(e["activity"]["object"]) == like["id"])
    assert entry["activity"]["object"]["type"] == "Like"
    react = peer.react("bob", post["id"], "🎉", to=[club])
    direct = peer.wait_for("club", "EmojiReact", lambda e: e["id"] == react["id"])
    assert direct["activity"]["content"] == "🎉"
    entry = peer.wait_for("alice", "Announce", lambda e: _id(e["activity"]["object"]) == react["id"])
    # Fedify's compaction of the embedded activity lacks the litepub prefix: the type comes as a full IRI
    assert entry["activity"]["object"]["type"] in ("EmojiReact", "http://litepub.social/ns#EmojiReact")
    assert entry["activity"]["object"]["content"] == "🎉"
    # carol does not follow the group: received and verified, not announced
    stranger = peer.note("carol", "<p>spam</p>", to=[club])
    got = peer.wait_for("club", "Create", lambda e: e["id"] == stranger["create"])
    assert got["verified"] is True
    assert got["group"]["announced"] is None and got["group"]["why"] == "sender does not follow the group"


# -- person to person -----------------------------------------------------------------------
def test_a_direct_note_keeps_summary_sensitive_mentions_and_attachments(peer: Fedify) -> None:
    alice, carol = peer.actor_url("alice"), peer.actor_url("carol")
    sent = peer.note("alice", "<p>spoiler inside</p>", to=[carol], summary="CW: film ending", sensitive=True,
                     mentions=[carol], attachments=[{"url": "http://127.0.0.1:1/cat.png", "mediaType": "image/png",
                                                     "name": "a cat"}])
    entry = peer.wait_for("carol", "Create", lambda e: e["id"] == sent["create"])
    _verified(entry, alice)
    assert entry["inbox"] == "carol"
    note = entry["activity"]["object"]
    assert note["id"] == sent["id"]
    assert note["summary"] == "CW: film ending"
    assert note["sensitive"] is True
    assert note["content"] == "<p>spoiler inside</p>"
    assert [t["href"] for t in as_list(note["tag"]) if t["type"] == "Mention"] == [carol]
    assert as_list(note["attachment"])[0]["mediaType"] == "image/png"
    assert "proof" in entry["activity"]  # Fedify adds an Object Integrity Proof
    # the note can be fetched from its id
    status, fetched = peer.get_ap(sent["id"])
    assert status == 200 and fetched["summary"] == "CW: film ending"

    updated = peer.update("alice", sent["id"], "<p>edited</p>")
    got = peer.wait_for("carol", "Update", lambda e: e["id"] == updated["id"])
    assert got["activity"]["object"]["content"] == "<p>edited</p>" and got["activity"]["object"]["updated"]
    deleted = peer.delete("alice", sent["id"])
    got = peer.wait_for("carol", "Delete", lambda e: e["id"] == deleted["id"])
    assert got["activity"]["object"]["type"] == "Tombstone" and got["activity"]["object"]["id"] == sent["id"]
    assert peer.get_ap(sent["id"])[0] == 404


def test_a_like_and_its_undo_arrive(peer: Fedify) -> None:
    bob = peer.actor_url("bob")
    post = peer.note("alice", "<p>like me</p>", to=[bob])
    like = peer.like("bob", post["id"])  # to the note's author, looked up
    got = peer.wait_for("alice", "Like", lambda e: e["id"] == like["id"])
    _verified(got, bob)
    assert got["activity"]["object"] == post["id"]
    undo = peer.undo_like("bob", post["id"])
    got = peer.wait_for("alice", "Undo", lambda e: e["id"] == undo["id"])
    _verified(got, bob)
    assert got["activity"]["object"]["type"] == "Like" and got["activity"]["object"]["id"] == like["id"]


def test_flag_move_and_also_known_as(peer: Fedify) -> None:
    alice, bob, carol = (peer.actor_url(n) for n in ("alice", "bob", "carol"))
    flag = peer.flag("carol", [bob], "rude", to=[alice])
    got = peer.wait_for("alice", "Flag", lambda e: e["id"] == flag["id"])
    assert got["activity"]["content"] == "rude" and as_list(got["activity"]["object"]) == [bob]

    dave = peer.create_actor("dave")
    peer.also_known_as("dave", [carol])
    assert peer.get_ap(dave)[1]["alsoKnownAs"] in (carol, [carol])
    peer.follow("alice", carol)
    peer.wait_for("alice", "Accept", lambda e: e["sender"] == carol)
    move = peer.move("carol", dave)
    got = peer.wait_for("alice", "Move", lambda e: e["id"] == move["id"])
    _verified(got, carol)
    assert got["activity"]["object"] == carol and got["activity"]["target"] == dave


def test_shared_inbox_boost_any_activity_and_unfollow(peer: Fedify, club: str) -> None:
    alice, bob, carol = (peer.actor_url(n) for n in ("alice", "bob", "carol"))
    sent = peer.note("alice", "<p>via the shared inbox</p>", to=[carol], shared_inbox=True)
    got = peer.wait_for("carol", "Create", lambda e: e["id"] == sent["create"])
    assert got["inbox"] is None and got["actors"] == ["carol"]
    boost = peer.announce("bob", sent["id"], to=[alice])
    got = peer.wait_for("alice", "Announce", lambda e: e["id"] == boost["id"])
    assert got["activity"]["object"] == sent["id"]
    block = peer.send("carol", {"type": "Block", "object": alice, "to": [alice]})
    got = peer.wait_for("alice", "Block", lambda e: e["id"] == block["id"])
    _verified(got, carol)
    assert got["activity"]["object"] == alice
    undo = peer.unfollow("bob", club)
    got = peer.wait_for("club", "Undo", lambda e: e["id"] == undo["id"])
    assert got["unfollowed"] == "club" and bob not in peer.followers("club")
    peer.follow("bob", club)  # back, for the other tests
    peer.wait_for("club", "Follow", lambda e: e["sender"] == bob and e["seq"] > got["seq"])
    assert bob in peer.followers("club")


# -- refusals ---------------------------------------------------------------------------------
def test_unsigned_and_badly_signed_posts_are_refused(peer: Fedify) -> None:
    forged = {"@context": "https://www.w3.org/ns/activitystreams", "id": "http://127.0.0.1:1/forged/1",
              "type": "Create", "actor": peer.actor_url("bob"), "to": [peer.actor_url("alice")],
              "object": {"id": "http://127.0.0.1:1/forged/note", "type": "Note", "content": "forged",
                         "attributedTo": peer.actor_url("bob")}}
    headers = {"Content-Type": "application/activity+json"}
    status, _ = peer.request("POST", "/users/alice/inbox", json.dumps(forged).encode(), headers=headers)
    assert status == 401
    entry = peer.wait_for(None, "Create", lambda e: e["id"] == forged["id"])
    assert entry["verified"] is False and entry["reason"] == "noSignature"
    assert entry["id"] not in [e["id"] for e in peer.log("alice")]

    bad = {**forged, "id": "http://127.0.0.1:1/forged/2"}
    sig = (f'keyId="{peer.actor_url("bob")}#main-key",algorithm="rsa-sha256",headers="(request-target) host date",'
           'signature="AAAA"')
    status, _ = peer.request("POST", "/users/alice/inbox", json.dumps(bad).encode(),
                             headers={**headers, "Date": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()),
                                      "Signature": sig})
    assert status == 401
    assert peer.wait_for(None, "Create", lambda e: e["id"] == bad["id"])["verified"] is False


def test_control_errors_are_reported(peer: Fedify) -> None:
    with pytest.raises(FedifyError) as err:
        peer.update("alice", "http://127.0.0.1:1/no-such-note", "x")
    assert err.value.status == 404
    with pytest.raises(FedifyError) as err:
        peer.ctl("POST", "note", {"actor": "alice"})
    assert err.value.status == 400 and "content" in err.value.body["error"]
    with pytest.raises(FedifyError) as err:
        peer.note("alice", "x", to=[peer.actor_url("nobody")])
    assert err.value.status == 502
    # a URL that is no actor (here another actor's followers collection) is addressed, not delivered to
    sent = peer.note("alice", "<p>hi</p>", to=[peer.actor_url("carol")], cc=[peer.url + "/users/bob/followers"])
    assert sent["delivered_to"] == [peer.inbox_url("carol")] and sent["skipped"] == []


def test_the_peer_log_is_kept_in_the_work_directory(peer: Fedify) -> None:
    assert Path(peer.log_path).exists()
    assert "fedify peer on" in peer.log_tail(10**7)
