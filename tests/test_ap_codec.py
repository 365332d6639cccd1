"""adapters/activitypub/decode.py and encode.py: pure translation, no I/O."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.activitypub import decode as D
from adapters.activitypub import encode as E
from schemas.v1 import Actor, Attachment, Message

ALICE = "https://social.example/users/alice"
GROUP = "https://gw.example/ap/groups/buurt"


def create(obj: dict[str, Any], kind: str = "Create", **extra: Any) -> dict[str, Any]:
    return {"id": obj["id"] + "#" + kind.lower(), "type": kind, "actor": ALICE, "object": obj,
            "to": [D.PUBLIC], "cc": GROUP, **extra}


def note(**extra: Any) -> dict[str, Any]:
    return {"id": "https://social.example/notes/1", "type": "Note", "attributedTo": ALICE,
            "content": "<p>Hello <b>buurt</b></p><p>second</p>", "to": D.PUBLIC, **extra}


def dec(activity: dict[str, Any], **kw: Any) -> Any:
    return D.decode_activity(activity, platform="fedi", **kw)


def test_a_note_with_everything() -> None:
    r = dec(create(note(summary="health", sensitive=True, inReplyTo="https://other.example/n/9",
                        tag={"type": "Mention", "href": "https://other.example/u/bob", "name": "@bob"},
                        attachment=[{"type": "Image", "mediaType": "image/png", "url": "https://social.example/a.png",
                                     "name": "a cat"}],
                        contentMap={"nl": "<p>Hallo</p>"})))
    assert isinstance(r, D.Decoded) and r.type == "civic.message.created"
    m: Message = r.payload
    assert m.id == "https://social.example/notes/1" and m.author.id == ALICE
    assert m.text == "Hello buurt\n\nsecond" and m.html == "<p>Hello <b>buurt</b></p><p>second</p>"
    assert m.warning == "health" and m.sensitive is True
    assert m.reply_to == "https://other.example/n/9" and m.language == "nl"
    assert [a.id for a in m.mentions] == ["https://other.example/u/bob"]  # a single tag, not a list
    assert m.attachments == (Attachment(url="https://social.example/a.png", media_type="image/png", alt="a cat"),)
    assert r.items[0].event_id == "https://social.example/notes/1#create"


def test_a_page_has_a_title_and_an_update_is_an_edit() -> None:
    r = dec(create(note(type="Page", name="Meeting"), "Update"))
    assert r.type == "civic.message.edited" and r.payload.title == "Meeting"


def test_a_summary_alone_makes_a_message_sensitive() -> None:
    assert dec(create(note(summary="spoilers"))).payload.sensitive is True
    assert dec(create(note())).payload.sensitive is False


def test_private_posts_and_boosts_stay_where_they_are() -> None:
    direct = create(note(to=["https://other.example/u/bob"]), to=["https://other.example/u/bob"], cc=[])
    assert dec(direct) == D.Ignored(D.NOT_PUBLIC)
    group_only = create(note(to=[GROUP], audience=GROUP), to=[GROUP], cc=[])
    assert isinstance(dec(group_only), D.Decoded)  # addressed to a group, with an audience
    boost = {"id": ALICE + "/b/1", "type": "Announce", "actor": ALICE, "object": "https://x.example/n/1"}
    assert dec(boost) == D.Ignored(D.BOOST)


def test_someone_elses_object_is_refused() -> None:
    with pytest.raises(D.APDecodeError, match="attributedTo"):
        dec(create(note(attributedTo="https://social.example/users/mallory")))


def test_deletions_by_the_author_and_by_a_moderator() -> None:
    delete = {"id": ALICE + "#del", "type": "Delete", "actor": ALICE,
              "object": {"id": "https://social.example/notes/1", "type": "Tombstone"}}
    assert dec(delete).type == "civic.message.deleted"
    assert dec(delete, author_of=ALICE).type == "civic.message.deleted"
    mod = dec({**delete, "actor": "https://social.example/users/mod", "summary": "spam"},
              author_of=ALICE)
    assert mod.type == "civic.moderation.action"
    assert mod.payload.action == "remove_message" and mod.payload.reason == "spam"
    assert mod.payload.member.id == ALICE and mod.payload.by.id == "https://social.example/users/mod"


def test_likes_emoji_reactions_and_their_undo() -> None:
    like = {"id": ALICE + "#like", "type": "Like", "actor": ALICE, "object": "https://gw.example/ap/notes/n1"}
    r = dec(like)
    assert r.type == "civic.reaction.added" and r.payload.key == D.LIKE_KEY
    react = {**like, "type": "http://litepub.social/ns#EmojiReact", "content": "🎉"}
    assert dec(react).payload.key == "🎉"
    undo = {"id": ALICE + "#undo", "type": "Undo", "actor": ALICE, "object": like["id"]}
    assert dec(undo) == D.Ignored(D.UNKNOWN_UNDO)
    assert dec(undo, undone=like).type == "civic.reaction.removed"
    with pytest.raises(D.APDecodeError):  # undoing someone else's like
        dec({**undo, "object": {**like, "actor": "https://social.example/users/bob"}})


def test_follow_unfollow_block() -> None:
    follow = {"id": ALICE + "#f", "type": "Follow", "actor": ALICE, "object": GROUP}
    assert dec(follow).payload.state == "joined"
    assert dec({"id": ALICE + "#u", "type": "Undo", "actor": ALICE, "object": follow}).payload.state == "left"
    block = dec({"id": GROUP + "#b", "type": "Block", "actor": GROUP, "object": ALICE, "summary": "spam"})
    assert block.payload.state == "banned" and block.payload.member.id == ALICE and block.payload.reason == "spam"


def test_a_flag_keeps_the_reporter_anonymous() -> None:
    r = dec({"id": "https://social.example/flag/1", "type": "Flag", "actor": "https://social.example/actor",
             "object": [ALICE, "https://social.example/users/alice/statuses/1"], "content": "<p>spam</p>"})
    assert r.type == "civic.report.filed"
    rep = r.payload
    assert rep.member.id == ALICE and rep.message == "https://social.example/users/alice/statuses/1"
    assert rep.text == "spam" and rep.reporter.identity == "anonymous"


def test_a_move_needs_proof_and_names_the_new_account_first() -> None:
    move = {"id": ALICE + "#move", "type": "Move", "actor": ALICE, "object": ALICE,
            "target": "https://new.example/users/alice"}
    assert dec(move) == D.Ignored(D.MOVE_UNPROVEN)
    r = dec(move, moved_to_alias=True)
    assert [i.type for i in r.items] == ["civic.profile.updated", "civic.account.moved"]
    assert r.items[0].payload.also_known_as[0].id == ALICE
    assert r.items[1].payload.target.id == "https://new.example/users/alice"


def test_malformed_activities_name_the_field() -> None:
    with pytest.raises(D.APDecodeError, match="`actor`"):
        dec({"id": "x", "type": "Create", "object": note()})
    with pytest.raises(D.APDecodeError, match="`type`"):
        dec({"id": "x", "actor": ALICE})


@given(st.recursive(st.none() | st.booleans() | st.text(max_size=20) | st.integers(),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(
                        st.sampled_from(["id", "type", "actor", "object", "to", "content", "summary", "tag",
                                         "attributedTo", "attachment", "inReplyTo", "target"]), c, max_size=6),
                    max_leaves=20))
@settings(max_examples=300, deadline=None)
def test_garbage_gives_a_decode_error_or_a_result_never_a_crash(value: Any) -> None:
    if isinstance(value, dict):
        value.setdefault("type", "Create")
    try:
        dec(value)
    except D.APDecodeError:
        pass


# -- encode ---------------------------------------------------------------------------------------------

URLS = E.Urls("https://gw.example")


def test_a_message_becomes_a_public_group_note_with_its_warning() -> None:
    msg = Message(id="cgm_1", author=Actor("cga_7", name="Dirk"), text="a\n\nb", warning="health",
                  mentions=(Actor("https://social.example/users/alice", name="Alice"),), language="nl",
                  attachments=(Attachment(url="https://x.example/p.png", media_type="image/png", alt="poster"),))
    n = E.note(URLS, msg, group_id=GROUP, published="2026-01-01T00:00:00Z", reply_to="https://x.example/n/1",
               followers=GROUP + "/followers")
    assert n["id"] == "https://gw.example/ap/notes/cgm_1" and n["attributedTo"] == "https://gw.example/ap/people/cga_7"
    assert n["content"] == "<p>a</p><p>b</p>" and n["summary"] == "health" and n["sensitive"] is True
    assert n["to"] == [E.PUBLIC, GROUP] and n["audience"] == GROUP and n["inReplyTo"] == "https://x.example/n/1"
    assert n["tag"] == [{"type": "Mention", "href": "https://social.example/users/alice", "name": "@Alice"}]
    assert "https://social.example/users/alice" in n["cc"] and n["contentMap"] == {"nl": n["content"]}
    assert n["attachment"] == [{"type": "Image", "mediaType": "image/png", "url": "https://x.example/p.png",
                                "name": "poster"}]
    back = D.message_from_object(n, n["attributedTo"])
    assert back.text == "a\n\nb" and back.warning == "health" and back.reply_to == "https://x.example/n/1"


def test_people_show_no_more_than_their_identity_level() -> None:
    anon = E.person_actor(URLS, Actor("anon_123", name="Dora Secret", identity="anonymous"), "PEM")
    assert anon["name"] == E.ANONYMOUS_NAME and "Dora" not in str(anon)
    named = E.person_actor(URLS, Actor("cga_1", name="Dirk"), "PEM")
    assert named["name"] == "Dirk" and named["publicKey"]["owner"] == named["id"]


def test_nothing_is_counted() -> None:
    docs = [E.group_actor(URLS, "buurt", "PEM"), E.person_actor(URLS, Actor("cga_1"), "PEM"),
            E.collection(GROUP + "/followers"), E.nodeinfo("1")]
    text = str(docs)
    for counter in ("totalItems", "followers_count", "likes", "shares", "activeMonth", "localPosts"):
        assert counter not in text


def test_an_announce_embeds_the_activity_without_its_context() -> None:
    inner = E.activity("Create", "https://gw.example/ap/activities/1", "https://gw.example/ap/people/cga_1", {})
    a = E.announce(URLS, "buurt", inner, "https://gw.example/ap/activities/2")
    assert a["actor"] == URLS.group("buurt") and a["object"]["id"] == inner["id"] and "@context" not in a["object"]
    assert a["cc"] == [URLS.group("buurt") + "/followers"]
