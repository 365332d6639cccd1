"""The Matrix adapter's pure parts: decode (every event the gateway carries,
every ignore case, fallbacks, spoilers, power levels, policy rules), encode
(content for messages, edits, reactions, redactions, media; display names and
ghost localparts) and the round trip decode(encode(x)). Events are shaped as
Synapse pushes them in appservice transactions (spec examples)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.matrix import decode as D
from adapters.matrix import encode as E
from schemas.v1 import Actor, Attachment, Membership, Message, MessageDeletion, ModerationAction, Reaction

SERVER = "hub.example"
BOT = f"@civic_bot:{SERVER}"
PREFIX = "civic_"
ROOM = "!kExdM0ngRoomV12"  # room v12: no server part
ALICE = f"@alice:{SERVER}"
BOB = f"@bob:{SERVER}"
MOD = f"@mod:{SERVER}"


def ev(type_: str, content: dict[str, Any], *, sender: str = ALICE, event_id: str = "$ev1", **extra: Any) -> dict:
    e = {"type": type_, "sender": sender, "room_id": ROOM, "event_id": event_id,
         "origin_server_ts": 1_700_000_000_123, "content": content, "unsigned": {"age": 12},
         "user_id": sender, "age": 12}
    e.update(extra)
    return e


def dec(event: dict, **kw: Any) -> D.Decoded | D.Ignored:
    return D.decode_event(event, bot_user=BOT, ghost_prefix=PREFIX, server_name=SERVER, **kw)


def one(event: dict, **kw: Any) -> tuple[str, Any]:
    r = dec(event, **kw)
    assert isinstance(r, D.Decoded), r
    assert len(r.items) == 1
    assert r.group == ROOM
    return r.type, r.payload


# -- messages ------------------------------------------------------------------------------------

def test_plain_text_message() -> None:
    r = dec(ev("m.room.message", {"msgtype": "m.text", "body": "Hallo buurt"}))
    assert isinstance(r, D.Decoded)
    assert r.time == pytest.approx(1_700_000_000.123)
    assert r.items[0].event_id == "$ev1"
    assert r.type == "civic.message.created"
    assert r.payload == Message(id="$ev1", author=Actor(ALICE), text="Hallo buurt")


def test_html_is_kept_for_the_core_to_sanitise() -> None:
    _, msg = one(ev("m.room.message", {"msgtype": "m.text", "body": "**bold** <script>",
                                       "format": "org.matrix.custom.html",
                                       "formatted_body": "<strong>bold</strong> <script>x</script>"}))
    assert msg.text == "**bold** <script>"
    assert msg.html == "<strong>bold</strong> <script>x</script>"


def test_formatted_body_in_another_format_is_ignored() -> None:
    _, msg = one(ev("m.room.message", {"msgtype": "m.text", "body": "hi", "format": "x-other",
                                       "formatted_body": "<b>hi</b>"}))
    assert msg.html is None


def test_reply_with_fallback_stripped() -> None:
    content = {
        "msgtype": "m.text",
        "body": "> <@bob:hub.example> The original\n> second line\n\nThis is my reply",
        "format": "org.matrix.custom.html",
        "formatted_body": ('<mx-reply><blockquote><a href="https://matrix.to/#/!r/$orig">In reply to</a> '
                           '<a href="https://matrix.to/#/@bob:hub.example">@bob</a><br>The original</blockquote>'
                           '</mx-reply>This is <em>my</em> reply'),
        "m.relates_to": {"m.in_reply_to": {"event_id": "$orig"}},
        "m.mentions": {"user_ids": [BOB]},
    }
    _, msg = one(ev("m.room.message", content))
    assert msg.reply_to == "$orig" and msg.thread is None
    assert msg.text == "This is my reply"
    assert msg.html == "This is <em>my</em> reply"
    assert msg.mentions == (Actor(BOB),)


def test_reply_without_fallback_keeps_a_quote_the_user_wrote() -> None:
    content = {"msgtype": "m.text", "body": "> a quote\n\nmine", "m.relates_to": {"m.in_reply_to": {"event_id": "$o"}}}
    _, msg = one(ev("m.room.message", content))
    assert msg.text == "> a quote\n\nmine"


def test_strip_reply_fallback_of_an_emote() -> None:
    assert D.strip_reply_fallback("> * <@bob:x> waves\n\nhello") == "hello"
    assert D.strip_reply_fallback("no fallback") == "no fallback"


def test_thread_message_falling_back() -> None:
    content = {"msgtype": "m.text", "body": "in the thread",
               "m.relates_to": {"rel_type": "m.thread", "event_id": "$root", "is_falling_back": True,
                                "m.in_reply_to": {"event_id": "$latest"}}}
    _, msg = one(ev("m.room.message", content))
    assert msg.thread == "$root" and msg.reply_to is None


def test_reply_inside_a_thread() -> None:
    content = {"msgtype": "m.text", "body": "answering you",
               "m.relates_to": {"rel_type": "m.thread", "event_id": "$root", "is_falling_back": False,
                                "m.in_reply_to": {"event_id": "$other"}}}
    _, msg = one(ev("m.room.message", content))
    assert msg.thread == "$root" and msg.reply_to == "$other"


def test_edit_takes_the_new_content_and_targets_the_original() -> None:
    content = {"msgtype": "m.text", "body": "* fixed typo", "format": "org.matrix.custom.html",
               "formatted_body": "* fixed <b>typo</b>",
               "m.new_content": {"msgtype": "m.text", "body": "fixed typo", "format": "org.matrix.custom.html",
                                 "formatted_body": "fixed <b>typo</b>"},
               "m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"}}
    r = dec(ev("m.room.message", content, event_id="$edit"))
    assert isinstance(r, D.Decoded)
    assert r.type == "civic.message.edited"
    assert r.items[0].event_id == "$edit"
    assert r.payload == Message(id="$orig", author=Actor(ALICE), text="fixed typo", html="fixed <b>typo</b>")


def test_edit_without_new_content_names_the_field() -> None:
    content = {"msgtype": "m.text", "body": "* x", "m.relates_to": {"rel_type": "m.replace", "event_id": "$o"}}
    with pytest.raises(D.MatrixDecodeError) as err:
        dec(ev("m.room.message", content))
    assert err.value.field == "content.m.new_content"


def test_mentions_from_m_mentions_and_from_pills() -> None:
    _, msg = one(ev("m.room.message", {"msgtype": "m.text", "body": "hi Bob, Bob",
                                       "m.mentions": {"user_ids": [BOB, BOB, MOD]}}))
    assert msg.mentions == (Actor(BOB), Actor(MOD))
    _, legacy = one(ev("m.room.message", {
        "msgtype": "m.text", "body": "hi Bob", "format": "org.matrix.custom.html",
        "formatted_body": 'hi <a href="https://matrix.to/#/%40bob%3Ahub.example">Bob</a>'}))
    assert legacy.mentions == (Actor(BOB),)
    # an explicit empty m.mentions wins over pills
    _, none = one(ev("m.room.message", {
        "msgtype": "m.text", "body": "hi", "format": "org.matrix.custom.html", "m.mentions": {},
        "formatted_body": '<a href="https://matrix.to/#/@bob:hub.example">Bob</a>'}))
    assert none.mentions == ()


def test_spoiler_with_reason_is_the_warning_and_the_text_is_kept() -> None:
    content = {"msgtype": "m.text", "body": "the butler did it", "format": "org.matrix.custom.html",
               "formatted_body": '<span data-mx-spoiler="film plot &amp; ending">the butler did it</span>'}
    _, msg = one(ev("m.room.message", content))
    assert msg.warning == "film plot & ending"
    assert msg.text == "the butler did it"
    assert msg.html is None  # the HTML only carried the spoiler


def test_spoiler_without_reason_gets_a_generic_warning() -> None:
    content = {"msgtype": "m.text", "body": "secret", "format": "org.matrix.custom.html",
               "formatted_body": "<span data-mx-spoiler>secret</span>"}
    _, msg = one(ev("m.room.message", content))
    assert msg.warning == D.GENERIC_WARNING and msg.text == "secret"


def test_partial_spoiler_keeps_the_html() -> None:
    html = 'before <span data-mx-spoiler="x">hidden</span> after'
    _, msg = one(ev("m.room.message", {"msgtype": "m.text", "body": "before hidden after",
                                       "format": "org.matrix.custom.html", "formatted_body": html}))
    assert msg.warning == "x" and msg.html == html


def test_html_with_a_spoiler_and_a_reply() -> None:
    content = {"msgtype": "m.text", "body": "> <@bob:hub.example> q\n\nCW: health\n\nmy <b>answer</b>",
               "format": "org.matrix.custom.html",
               "formatted_body": ('<mx-reply><blockquote>q</blockquote></mx-reply>'
                                  '<span data-mx-spoiler="health">my <b>answer</b></span>'),
               "m.relates_to": {"m.in_reply_to": {"event_id": "$q"}}}
    _, msg = one(ev("m.room.message", content))
    assert msg.reply_to == "$q"
    assert msg.warning == "health"
    assert msg.text == "my <b>answer</b>"
    assert msg.html == "my <b>answer</b>"


def test_unknown_msgtype_falls_back_to_body() -> None:
    _, msg = one(ev("m.room.message", {"msgtype": "pubhubs.voting_widget", "body": "Vote: yes or no?"}))
    assert msg.text == "Vote: yes or no?"
    _, loc = one(ev("m.room.message", {"msgtype": "m.location", "body": "Town hall",
                                       "geo_uri": "geo:52.1,5.1"}))
    assert loc.text == "Town hall" and loc.attachments == ()


def test_notice_and_emote() -> None:
    _, notice = one(ev("m.room.message", {"msgtype": "m.notice", "body": "bot says"}))
    assert notice.text == "bot says"
    _, emote = one(ev("m.room.message", {"msgtype": "m.emote", "body": "waves"}))
    assert emote.text == "* waves"


def test_image_attachment() -> None:
    content = {"msgtype": "m.image", "body": "a map of the park", "filename": "park.png",
               "url": "mxc://hub.example/AQwafuaFswefuhsfAFAgsw",
               "info": {"mimetype": "image/png", "size": 31037, "w": 394, "h": 398}}
    _, msg = one(ev("m.room.message", content))
    assert msg.attachments == (Attachment(url="mxc://hub.example/AQwafuaFswefuhsfAFAgsw", media_type="image/png",
                                          alt="a map of the park", name="park.png", size=31037),)
    assert msg.text == "a map of the park"  # a caption, since filename differs


def test_file_attachment_whose_body_is_the_name() -> None:
    content = {"msgtype": "m.file", "body": "notulen.pdf", "url": "mxc://hub.example/xyz",
               "info": {"mimetype": "application/pdf"}}
    _, msg = one(ev("m.room.message", content))
    assert msg.text == ""
    assert msg.attachments == (Attachment(url="mxc://hub.example/xyz", media_type="application/pdf",
                                          name="notulen.pdf"),)


def test_attachment_without_mimetype_and_with_a_bad_url() -> None:
    _, msg = one(ev("m.room.message", {"msgtype": "m.image", "body": "pic", "url": "mxc://h/id"}))
    assert msg.attachments[0].media_type == "image/png"
    with pytest.raises(D.MatrixDecodeError) as err:
        dec(ev("m.room.message", {"msgtype": "m.file", "body": "f", "url": "https://evil/x"}))
    assert err.value.field == "content.url"


def test_encrypted_file_without_url_falls_back_to_text() -> None:
    _, msg = one(ev("m.room.message", {"msgtype": "m.file", "body": "x.pdf", "file": {"url": "mxc://h/e"}}))
    assert msg.text == "x.pdf" and msg.attachments == ()


def test_malformed_fields_are_named() -> None:
    with pytest.raises(D.MatrixDecodeError) as err:
        dec(ev("m.room.message", {"msgtype": "m.text", "body": 5}))
    assert err.value.field == "content.body" and "content.body" in str(err.value)
    bad = ev("m.room.message", {"body": "x"})
    del bad["event_id"]
    with pytest.raises(D.MatrixDecodeError) as err:
        dec(bad)
    assert err.value.field == "event_id"
    with pytest.raises(D.MatrixDecodeError) as err:
        dec(ev("m.room.message", {"msgtype": "m.text", "body": "x" * 70000}))
    assert err.value.field.startswith("content") and err.value.status == 400


# -- ignored ------------------------------------------------------------------------------------

@pytest.mark.parametrize("event, reason", [
    (ev("m.room.message", {"msgtype": "m.text", "body": "echo"}, sender=f"@civic_anna:{SERVER}"), D.ECHO),
    (ev("m.room.message", {"msgtype": "m.text", "body": "echo"}, sender=BOT), D.ECHO),
    (ev("m.reaction", {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$x", "key": "👍"}},
        sender=f"@civic_x:{SERVER}"), D.ECHO),
    (ev("m.room.message", {}), D.REDACTED),
    (ev("m.room.encrypted", {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "..."}), D.UNSUPPORTED),
    (ev("m.room.topic", {"topic": "t"}, state_key=""), D.STATE_NOT_CARRIED),
    (ev("m.room.member", {"membership": "join", "displayname": "Alice 2"}, state_key=ALICE,
        unsigned={"prev_content": {"membership": "join", "displayname": "Alice"}}), D.PROFILE_CHANGE),
    (ev("m.room.member", {"membership": "join"}, sender=MOD, state_key=BOT), D.BOT_MEMBERSHIP),
    (ev("m.room.member", {"membership": "knock"}, state_key=ALICE), D.STATE_NOT_CARRIED),
    (ev("m.policy.rule.user", {"entity": "@spam*:*", "recommendation": "m.ban"}, state_key="r1"), D.POLICY_RULE),
    (ev("m.room.power_levels", {"users": {ALICE: 100}}, state_key="",
        unsigned={"prev_content": {"users": {ALICE: 100}}}), D.NO_CHANGE),
])
def test_ignored(event: dict, reason: str) -> None:
    assert dec(event) == D.Ignored(reason)


def test_a_user_on_another_server_with_the_prefix_is_not_a_ghost() -> None:
    assert D.is_ghost(f"@civic_anna:{SERVER}", ghost_prefix=PREFIX, server_name=SERVER)
    assert not D.is_ghost("@civic_anna:other.example", ghost_prefix=PREFIX, server_name=SERVER)
    t, _ = one(ev("m.room.message", {"msgtype": "m.text", "body": "hi"}, sender="@civic_anna:other.example"))
    assert t == "civic.message.created"


# -- reactions and redactions -------------------------------------------------------------------

def test_reaction() -> None:
    t, r = one(ev("m.reaction", {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$msg", "key": "👍"}}))
    assert t == "civic.reaction.added"
    assert r == Reaction(message="$msg", author=Actor(ALICE), key="👍")


def test_redaction_by_the_author_is_a_deletion() -> None:
    red = ev("m.room.redaction", {"redacts": "$msg", "reason": "oops"}, event_id="$red", redacts="$msg")
    t, p = one(red, redacted={"type": "m.room.message", "sender": ALICE})
    assert t == "civic.message.deleted"
    assert p == MessageDeletion(id="$msg", reason="oops")


def test_redaction_by_someone_else_is_a_moderation_removal() -> None:
    red = ev("m.room.redaction", {"redacts": "$msg", "reason": "spam"}, sender=MOD, redacts="$msg")
    t, p = one(red, redacted={"type": "m.room.message", "sender": ALICE, "event_id": "$msg"})
    assert t == "civic.moderation.action"
    assert p == ModerationAction(action="remove_message", message="$msg", member=Actor(ALICE), by=Actor(MOD),
                                 reason="spam")


def test_moderator_redacting_a_ghosts_message() -> None:
    red = ev("m.room.redaction", {"redacts": "$g"}, sender=MOD)
    t, p = one(red, redacted={"type": "m.room.message", "sender": f"@civic_anna:{SERVER}"})
    assert t == "civic.moderation.action" and p.member == Actor(f"@civic_anna:{SERVER}")


def test_redaction_with_unknown_target_and_old_room_format() -> None:
    red = ev("m.room.redaction", {}, sender=MOD, redacts="$old")  # room v1-v10: top level only
    t, p = one(red)
    assert t == "civic.message.deleted" and p == MessageDeletion(id="$old", by=Actor(MOD))
    with pytest.raises(D.MatrixDecodeError) as err:
        dec(ev("m.room.redaction", {}))
    assert err.value.field == "content.redacts"


def test_redacting_a_reaction_removes_it() -> None:
    red = ev("m.room.redaction", {"redacts": "$react"})
    t, p = one(red, redacted={"type": "m.reaction", "sender": ALICE,
                              "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$m", "key": "🎉"}}})
    assert t == "civic.reaction.removed"
    assert p == Reaction(message="$m", author=Actor(ALICE), key="🎉")


# -- memberships and roles ----------------------------------------------------------------------

def member(membership: str, *, sender: str, target: str = ALICE, prev: str | None = None, **content: Any) -> dict:
    unsigned = {"prev_content": {"membership": prev}} if prev else {}
    return ev("m.room.member", {"membership": membership, **content}, sender=sender, state_key=target,
              unsigned=unsigned)


@pytest.mark.parametrize("event, expected", [
    (member("join", sender=ALICE, displayname="Alice"), Membership(member=Actor(ALICE, name="Alice"), state="joined")),
    (member("join", sender=ALICE, prev="invite"), Membership(member=Actor(ALICE), state="joined")),
    (member("leave", sender=ALICE, prev="join"), Membership(member=Actor(ALICE), state="left")),
    (member("leave", sender=MOD, prev="join", reason="test kick"),
     Membership(member=Actor(ALICE), state="kicked", by=Actor(MOD), reason="test kick")),
    (member("ban", sender=MOD, prev="join", reason="spam"),
     Membership(member=Actor(ALICE), state="banned", by=Actor(MOD), reason="spam")),
    (member("leave", sender=MOD, prev="ban"), Membership(member=Actor(ALICE), state="unbanned", by=Actor(MOD))),
    (member("invite", sender=BOB), Membership(member=Actor(ALICE), state="invited", by=Actor(BOB))),
    (member("ban", sender=MOD, target=f"@civic_anna:{SERVER}"),
     Membership(member=Actor(f"@civic_anna:{SERVER}"), state="banned", by=Actor(MOD))),
])
def test_memberships(event: dict, expected: Membership) -> None:
    t, p = one(event)
    assert t == "civic.membership.changed"
    assert p == expected


def test_power_level_diff_gives_role_changes() -> None:
    old = {"users": {MOD: 50, ALICE: 0, BOB: 100}, "users_default": 0, "redact": 50}
    new = {"users": {MOD: 100, ALICE: 60, BOB: 100, "@carol:hub.example": 10}, "users_default": 0}
    r = dec(ev("m.room.power_levels", new, sender=BOB, state_key="", event_id="$pl",
               unsigned={"prev_content": old}))
    assert isinstance(r, D.Decoded)
    assert [(i.event_id, i.payload) for i in r.items] == [
        (f"$pl|{ALICE}", Membership(member=Actor(ALICE), state="role_changed", role="moderator", by=Actor(BOB))),
        (f"$pl|{MOD}", Membership(member=Actor(MOD), state="role_changed", role="admin", by=Actor(BOB))),
    ]


def test_power_levels_given_by_the_adapter_and_removed_users() -> None:
    r = dec(ev("m.room.power_levels", {"users": {}, "users_default": 0}, sender=BOB, state_key=""),
            prev_power_levels={"users": {MOD: 75}})
    assert isinstance(r, D.Decoded) and r.payload.member == Actor(MOD) and r.payload.role == "member"
    assert D.role_changes({}, {"users": {ALICE: "50"}}) == [(ALICE, "moderator")]
    assert D.role_changes({"users_default": 0}, {"users_default": 50}) == []
    assert [D.role_for_level(n) for n in (-5, 0, 49, 50, 99, 100, 9000)] == \
        ["member", "member", "member", "moderator", "moderator", "admin", "admin"]


# -- policy rules -------------------------------------------------------------------------------

def test_policy_rules() -> None:
    user = ev("m.policy.rule.user", {"entity": "@spammer*:*", "recommendation": "m.ban", "reason": "spam"},
              sender=MOD, state_key="rule:@spammer*:*")
    assert D.decode_policy_rule(user) == D.PolicyRule(kind="user", entity_glob="@spammer*:*", recommendation="m.ban",
                                                      reason="spam", state_key="rule:@spammer*:*")
    server = ev("m.policy.rule.server", {"entity": "*.evil.example", "recommendation": "m.ban"}, state_key="s")
    rule = D.decode_policy_rule(server)
    assert rule is not None and rule.kind == "server" and rule.reason is None
    gone = D.decode_policy_rule(ev("m.policy.rule.user", {}, state_key="rule:@spammer*:*"))
    assert gone is not None and gone.removed and gone.state_key == "rule:@spammer*:*"
    assert D.decode_policy_rule(ev("m.policy.rule.room", {"entity": "!r", "recommendation": "m.ban"},
                                   state_key="x")) is None
    assert D.decode_policy_rule(ev("m.room.message", {"body": "x"})) is None
    with pytest.raises(D.MatrixDecodeError) as err:
        D.decode_policy_rule(ev("m.policy.rule.user", {"recommendation": "m.ban"}, state_key="x"))
    assert err.value.field == "content.entity"


def test_glob_matches() -> None:
    assert D.glob_matches("@spammer*:*", "@spammer42:evil.example")
    assert not D.glob_matches("@spammer*:*", "@alice:hub.example")
    assert D.glob_matches("*.evil.example", "matrix.evil.example")
    assert D.glob_matches("h?b.example", "hub.example") and not D.glob_matches("h?b.example", "huub.example")
    assert not D.glob_matches("a.b", "axb")


# -- encode -------------------------------------------------------------------------------------

def test_message_content_plain() -> None:
    c = E.message_content(Message(id="m1", author=Actor("a"), text="Hallo"))
    assert c == {"msgtype": "m.text", "body": "Hallo", "m.mentions": {}}


def test_message_content_with_warning_html_reply_and_mentions() -> None:
    msg = Message(id="m1", author=Actor("a"), text="see Bob", html="see <b>Bob</b>", warning='war & "peace"')
    c = E.message_content(msg, reply_to_event="$q", mention_users=[BOB, BOB])
    assert c["body"] == 'CW: war & "peace"\n\nsee Bob'
    assert c["format"] == "org.matrix.custom.html"
    assert c["formatted_body"] == '<span data-mx-spoiler="war &amp; &quot;peace&quot;">see <b>Bob</b></span>'
    assert c["m.relates_to"] == {"m.in_reply_to": {"event_id": "$q"}}
    assert c["m.mentions"] == {"user_ids": [BOB]}


def test_warning_on_plain_text_makes_html() -> None:
    c = E.message_content(Message(id="m", author=Actor("a"), text="a < b\nc", warning="maths"))
    assert c["formatted_body"] == '<span data-mx-spoiler="maths">a &lt; b<br>c</span>'


def test_thread_relations() -> None:
    msg = Message(id="m", author=Actor("a"), text="t")
    assert E.message_content(msg, thread_root="$root", thread_latest="$last")["m.relates_to"] == {
        "rel_type": "m.thread", "event_id": "$root", "is_falling_back": True, "m.in_reply_to": {"event_id": "$last"}}
    assert E.message_content(msg, thread_root="$root", reply_to_event="$r")["m.relates_to"] == {
        "rel_type": "m.thread", "event_id": "$root", "is_falling_back": False, "m.in_reply_to": {"event_id": "$r"}}


def test_edit_content() -> None:
    msg = Message(id="m", author=Actor("a"), text="new", html="<i>new</i>")
    c = E.edit_content(msg, target_event="$orig", mention_users=[BOB], new_mention_users=[])
    assert c["body"] == "* new" and c["formatted_body"] == "* <i>new</i>"
    assert c["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$orig"}
    assert c["m.new_content"] == {"msgtype": "m.text", "body": "new", "format": "org.matrix.custom.html",
                                  "formatted_body": "<i>new</i>", "m.mentions": {"user_ids": [BOB]}}
    assert c["m.mentions"] == {}
    # and it decodes as the edit of $orig with the new content
    r = dec(ev("m.room.message", c, sender=ALICE, event_id="$e"))
    assert isinstance(r, D.Decoded) and r.type == "civic.message.edited"
    assert (r.payload.id, r.payload.text, r.payload.html, r.payload.mentions) == ("$orig", "new", "<i>new</i>",
                                                                                  (Actor(BOB),))


def test_reaction_and_redaction_content() -> None:
    assert E.reaction_content("$m", "👍") == {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$m",
                                                                "key": "👍"}}
    assert E.redaction_reason(MessageDeletion(id="m", reason="mistake")) == "mistake"
    assert E.redaction_reason(ModerationAction(action="remove_message", category="child_safety")) == "child safety"
    assert E.redaction_reason(MessageDeletion(id="m")) is None
    assert E.redaction_content(MessageDeletion(id="m"), "$x") == {"redacts": "$x"}
    c = E.redaction_content(ModerationAction(action="remove_message", reason="spam"), "$x")
    assert one(ev("m.room.redaction", c, sender=MOD), redacted={"sender": ALICE})[1].reason == "spam"


def test_attachment_content() -> None:
    img = Attachment(url="mxc://hub.example/abc", media_type="image/jpeg", alt="a dog", name="dog.jpg", size=100)
    c = E.attachment_content(img)
    assert c == {"msgtype": "m.image", "body": "a dog", "url": "mxc://hub.example/abc", "filename": "dog.jpg",
                 "info": {"mimetype": "image/jpeg", "size": 100}}
    _, back = one(ev("m.room.message", c))
    assert back.attachments == (img,)
    doc = Attachment(url="https://site.example/files/notulen.pdf", media_type="application/pdf")
    c = E.attachment_content(doc, mxc_url="mxc://hub.example/pdf", reply_to_event="$q")
    assert c["msgtype"] == "m.file" and c["body"] == "notulen.pdf" and c["url"] == "mxc://hub.example/pdf"
    assert c["m.relates_to"] == {"m.in_reply_to": {"event_id": "$q"}}
    with pytest.raises(ValueError, match="upload it first"):
        E.attachment_content(doc)


def test_member_display_name_follows_identity() -> None:
    assert E.member_display_name(Actor("x1", name="Anna de Vries", identity="identified")) == "Anna de Vries"
    assert E.member_display_name(Actor("x1", name="Buurtvrouw", identity="pseudonymous")) == "Buurtvrouw"
    assert E.member_display_name(Actor("anna@buurt", name="Anna", identity="anonymous")) == E.ANONYMOUS_LABEL
    assert E.member_display_name(Actor("h7", identity="pseudonymous")) == "h7"
    assert E.member_display_name(Actor("x", name="evil\x00\nname")) == "evil name"
    assert len(E.member_display_name(Actor("x", name="n" * 256))) == 256


def test_ghost_localpart() -> None:
    assert E.ghost_localpart("civic_", "anna-7") == "civic_anna-7"
    assert E.ghost_localpart("civic_", "Anna_B") == "civic__anna___b"
    assert E.ghost_localpart("civic_", "anna@buurt.example") == "civic_anna=40buurt.example"
    assert E.ghost_localpart("civic_", "é") == "civic_=c3=a9"
    assert E.ghost_localpart("civic_", "a=b") == "civic_a=3db"
    long = E.ghost_localpart("civic_", "x" * 500)
    assert len(long) == E.MAX_LOCALPART and long == E.ghost_localpart("civic_", "x" * 500)
    assert long != E.ghost_localpart("civic_", "x" * 499)
    with pytest.raises(ValueError):
        E.ghost_localpart("Civic ", "a")


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_ghost_localparts_are_valid_and_distinct(stand_in: str) -> None:
    local = E.ghost_localpart("civic_", stand_in)
    assert re.fullmatch(r"[a-z0-9._=/-]+", local) and len(local) <= E.MAX_LOCALPART
    assert local == E.ghost_localpart("civic_", stand_in)
    other = stand_in + "A"
    assert E.ghost_localpart("civic_", other) != local


@given(st.text(min_size=1, max_size=60))
@settings(max_examples=300, deadline=None)
def test_a_ghost_user_id_gives_back_its_stand_in(stand_in: str) -> None:
    local = E.ghost_localpart("civic_", stand_in)
    user = f"@{local}:hub.example"
    if len(E.ghost_localpart("civic_", stand_in, max_length=10**6)) <= E.MAX_LOCALPART:  # not shortened
        assert E.stand_in_of("civic_", user, "hub.example") == stand_in
    else:
        assert E.stand_in_of("civic_", user, "hub.example") is None


def test_stand_in_of_refuses_what_no_ghost_is() -> None:
    assert E.stand_in_of("civic_", "@alice:hub.example", "hub.example") is None
    assert E.stand_in_of("civic_", "@civic_cga_1:other.example", "hub.example") is None
    assert E.stand_in_of("civic_", "@civic_a=zz:hub.example", "hub.example") is None  # not hex
    assert E.stand_in_of("civic_", "@civic_a_1:hub.example", "hub.example") is None  # _ before a digit
    assert E.stand_in_of("civic_", f"@{E.ghost_localpart('civic_', 'x' * 500)}:hub.example", "hub.example") is None
    assert E.stand_in_of("civic_", "@civic_cga__01ab:hub.example", "hub.example") == "cga_01ab"


def test_mentions_become_pills_in_the_html_and_read_back_as_mentions() -> None:
    msg = Message(id="$m", author=Actor(ALICE), text="thanks @Bob <3 and @Nobody", mentions=(Actor("cga_b", name="Bob"),))
    content = E.message_content(msg, mention_users=["@civic_cga__b:hub"], pills=[("@civic_cga__b:hub", "Bob")])
    assert content["formatted_body"] == ('thanks <a href="https://matrix.to/#/@civic_cga__b:hub">Bob</a> &lt;3 and '
                                         "@Nobody")
    assert content["body"] == "thanks @Bob <3 and @Nobody" and content["m.mentions"] == {"user_ids": ["@civic_cga__b:hub"]}
    back = dec(ev("m.room.message", {k: v for k, v in content.items() if k != "m.mentions"}))
    assert isinstance(back, D.Decoded) and [a.id for a in back.payload.mentions] == ["@civic_cga__b:hub"]
    no_name = E.message_content(msg, mention_users=["@x:hub"], pills=[("@x:hub", "")])
    assert "formatted_body" not in no_name  # nothing to make a pill of: plain text stays plain


# -- round trip ---------------------------------------------------------------------------------

def roundtrip(msg: Message, **kw: Any) -> Message:
    content = E.message_content(msg, mention_users=[m.id for m in msg.mentions], **kw)
    r = dec(ev("m.room.message", content, sender=msg.author.id, event_id=msg.id))
    assert isinstance(r, D.Decoded) and r.type == "civic.message.created"
    return r.payload


def test_round_trip_examples() -> None:
    base = Message(id="$m", author=Actor(ALICE), text="x")
    for msg in [
        base,
        Message(id="$m", author=Actor(ALICE), text="a\nb", html="<p>a</p><p>b</p>"),
        Message(id="$m", author=Actor(ALICE), text="plot", warning="spoilers"),
        Message(id="$m", author=Actor(ALICE), text="plot", html="<b>plot</b>", warning="a<b"),
        Message(id="$m", author=Actor(ALICE), text="hi", html='<span data-mx-spoiler="in">x</span> y',
                warning="in"),
        Message(id="$m", author=Actor(ALICE), text="@bob hi", mentions=(Actor(BOB),)),
    ]:
        assert roundtrip(msg) == msg
    assert roundtrip(base, reply_to_event="$q").reply_to == "$q"
    threaded = roundtrip(base, thread_root="$root", thread_latest="$l")
    assert (threaded.thread, threaded.reply_to) == ("$root", None)
    both = roundtrip(base, thread_root="$root", reply_to_event="$r")
    assert (both.thread, both.reply_to) == ("$root", "$r")


_user_ids = st.from_regex(r"@[a-z0-9]{1,8}:[a-z]{1,8}\.example", fullmatch=True)
_words = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@given(text=_words,
       html=st.none() | st.sampled_from(["<b>x</b>", "<p>a</p><p>b &amp; c</p>", "<i>é</i>"])
       | st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60).filter(str.strip),
       warning=st.none() | st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)
       .filter(lambda w: w.strip() == w and w != ""),
       reply=st.none() | st.just("$reply"), thread=st.none() | st.just("$root"),
       mentioned=st.lists(_user_ids, max_size=4, unique=True))
@settings(max_examples=400, deadline=None)
def test_round_trip_property(text: str, html: str | None, warning: str | None, reply: str | None,
                             thread: str | None, mentioned: list[str]) -> None:
    if warning is not None and html == D.plain_to_html(text):
        html = None  # the same meaning: the decoder reads such HTML as "no HTML beyond the text"
    msg = Message(id="$m", author=Actor(ALICE), text=text, html=html, warning=warning,
                  mentions=tuple(Actor(u) for u in mentioned))
    back = roundtrip(msg, reply_to_event=reply, thread_root=thread)
    assert (back.text, back.html, back.warning, back.mentions) == (msg.text, msg.html, msg.warning, msg.mentions)
    assert (back.reply_to, back.thread) == (reply, thread)


def test_sensitive_without_warning_and_title() -> None:
    c = E.message_content(Message(id="m", author=Actor("a"), text="photo talk", sensitive=True))
    assert c["body"] == "photo talk" and c["formatted_body"] == "<span data-mx-spoiler>photo talk</span>"
    _, back = one(ev("m.room.message", c))
    assert back.warning == D.GENERIC_WARNING and back.text == "photo talk" and back.html is None
    c = E.message_content(Message(id="m", author=Actor("a"), text="body", title="Agenda <1>", warning="w"))
    assert c["body"] == "CW: w\n\nAgenda <1>\n\nbody"
    assert c["formatted_body"] == '<span data-mx-spoiler="w"><strong>Agenda &lt;1&gt;</strong><br>body</span>'


def test_mx_reply_is_stripped_from_a_thread_fallback_too() -> None:
    content = {"msgtype": "m.text", "body": "> <@bob:hub.example> earlier\n\nnew in thread",
               "format": "org.matrix.custom.html",
               "formatted_body": "<mx-reply><blockquote>earlier</blockquote></mx-reply><i>new</i> in thread",
               "m.relates_to": {"rel_type": "m.thread", "event_id": "$root", "is_falling_back": True,
                                "m.in_reply_to": {"event_id": "$latest"}}}
    _, msg = one(ev("m.room.message", content))
    assert (msg.text, msg.html, msg.reply_to, msg.thread) == ("new in thread", "<i>new</i> in thread", None, "$root")


def test_withdrawn_invite_is_not_a_kick() -> None:
    t, p = one(member("leave", sender=BOB, prev="invite"))
    assert p == Membership(member=Actor(ALICE), state="left", by=Actor(BOB))


def test_to_inbound() -> None:
    from gateway.ids import PlatformName

    r = dec(ev("m.room.power_levels", {"users": {ALICE: 50, BOB: 100}}, sender=MOD, state_key="", event_id="$pl"))
    assert isinstance(r, D.Decoded)
    records = r.to_inbound(PlatformName("hub"), now=5.0)
    assert [(x.platform, x.group, x.event_id, x.type, x.time) for x in records] == [
        ("hub", ROOM, f"$pl|{ALICE}", "civic.membership.changed", pytest.approx(1_700_000_000.123)),
        ("hub", ROOM, f"$pl|{BOB}", "civic.membership.changed", pytest.approx(1_700_000_000.123)),
    ]
    untimed = ev("m.room.message", {"msgtype": "m.text", "body": "x"})
    del untimed["origin_server_ts"]
    r = dec(untimed)
    assert isinstance(r, D.Decoded) and r.to_inbound(PlatformName("hub"), now=5.0)[0].time == 5.0


# -- hostile events: refused with a reason, never a crash --------------------------------------------

def refused(event: Any) -> D.MatrixDecodeError:
    with pytest.raises(D.MatrixDecodeError) as caught:
        dec(event)
    return caught.value


TEXT = {"msgtype": "m.text", "body": "hallo"}


@pytest.mark.parametrize("ts", [2**64, 2**63, 10**20, 1e308, 1.5, -1, True, "1700000000000", [1], {"ms": 1},
                                D.TS_MAX + 1])
def test_an_origin_server_ts_no_target_can_write_is_refused(ts: Any) -> None:
    err = refused(ev("m.room.message", TEXT, origin_server_ts=ts))
    assert (err.reason, err.field) == (D.BAD_NUMBER, "origin_server_ts")


def test_the_latest_and_earliest_timestamps_are_taken() -> None:
    from schemas.cloudevents import format_time

    latest = dec(ev("m.room.message", TEXT, origin_server_ts=D.TS_MAX))
    assert isinstance(latest, D.Decoded) and format_time(latest.time).startswith("9999-12-31T23:59:59")
    zero = dec(ev("m.room.message", TEXT, origin_server_ts=0))
    assert isinstance(zero, D.Decoded) and zero.time == 0.0  # to_inbound makes it the time received


@pytest.mark.parametrize("change, field, reason", [
    ({"content": ["not", "an", "object"]}, "content", D.MALFORMED),
    ({"content": "text"}, "content", D.MALFORMED),
    ({"unsigned": ["x"]}, "unsigned", D.MALFORMED),
    ({"unsigned": 7}, "unsigned", D.MALFORMED),
    ({"room_id": 12}, "room_id", D.MALFORMED),
    ({"room_id": ["!a"]}, "room_id", D.MALFORMED),
    ({"event_id": ["$a"]}, "event_id", D.MALFORMED),
    ({"event_id": {"$a": 1}}, "event_id", D.MALFORMED),
    ({"sender": None}, "sender", D.MALFORMED),
    ({"type": ["m.room.message"]}, "type", D.MALFORMED),
    ({"event_id": "$a\x00b"}, "event_id", D.BAD_ID),
    ({"sender": "@a\x1b[2J:hub.example"}, "sender", D.BAD_ID),
    ({"room_id": "!" + "r" * 300}, "room_id", D.BAD_ID),
    ({"state_key": "@a\x00:hub.example"}, "state_key", D.BAD_ID),
    ({"state_key": ["x"]}, "state_key", D.MALFORMED),
])
def test_a_malformed_envelope_is_refused_with_the_field_and_a_reason(change: dict, field: str, reason: str) -> None:
    event = {**ev("m.room.message", TEXT), **change}
    err = refused(event)
    assert (err.field, err.reason) == (field, reason)
    with pytest.raises(D.MatrixDecodeError):
        D.check_envelope(event)


@pytest.mark.parametrize("content, field, reason", [
    ({"msgtype": ["m.text"], "body": "x"}, "content.msgtype", D.MALFORMED),
    ({"msgtype": {"m": 1}, "body": "x"}, "content.msgtype", D.MALFORMED),
    ({**TEXT, "m.relates_to": {"m.in_reply_to": {"event_id": "$x\x00"}}},
     "content.m.relates_to.m.in_reply_to.event_id", D.BAD_ID),
    ({**TEXT, "m.relates_to": {"rel_type": "m.thread", "event_id": "$root\n"}}, "content.m.relates_to.event_id",
     D.BAD_ID),
    ({**TEXT, "m.new_content": TEXT, "m.relates_to": {"rel_type": "m.replace", "event_id": "$\x07"}},
     "content.m.relates_to.event_id", D.BAD_ID),
    ({"msgtype": "m.text", "body": "x" * 70000}, "content.text", D.SCHEMA_LIMIT),
])
def test_malformed_message_content_is_refused(content: dict, field: str, reason: str) -> None:
    err = refused(ev("m.room.message", content))
    assert (err.field, err.reason) == (field, reason)


def test_a_member_event_with_a_nul_in_its_state_key_and_a_redaction_of_one_are_refused() -> None:
    assert refused(member("join", sender=ALICE, target="@a\x00:hub.example")).reason == D.BAD_ID
    assert refused(ev("m.room.redaction", {"redacts": "$x\x00y"})).reason == D.BAD_ID


def test_ids_with_control_characters_are_left_out_where_the_event_holds_many() -> None:
    _, msg = one(ev("m.room.message", {**TEXT, "m.mentions": {"user_ids": [BOB, "@e\x00ve:hub.example"]}}))
    assert msg.mentions == (Actor(BOB),)
    r = dec(ev("m.room.power_levels", {"users": {BOB: 50, "@e\x00ve:hub.example": 100}}, sender=MOD,
               state_key=""))
    assert isinstance(r, D.Decoded) and [i.payload.member.id for i in r.items] == [BOB]


def test_an_attachment_size_past_what_json_readers_read_exactly_is_dropped() -> None:
    _, msg = one(ev("m.room.message", {"msgtype": "m.file", "body": "f.pdf", "url": "mxc://hub.example/abc",
                                       "info": {"size": 2**64, "mimetype": "application/pdf"}}))
    assert msg.attachments[0].size is None


def test_a_policy_rule_of_an_unhashable_type_is_none() -> None:
    assert D.decode_policy_rule({"type": ["m.policy.rule.user"], "state_key": "x", "content": {}}) is None


_hostile_values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                            st.floats(), st.text(max_size=8), st.lists(st.text(max_size=3), max_size=2),
                            st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["type", "sender", "room_id", "event_id", "content", "unsigned", "state_key",
                        "origin_server_ts", "redacts"]),
       st.sampled_from(["m.room.message", "m.reaction", "m.room.redaction", "m.room.member", "m.room.power_levels",
                        "m.policy.rule.user"]),
       _hostile_values,
       st.sampled_from(["msgtype", "body", "m.relates_to", "membership", "users", "url", "info", "m.mentions"]),
       _hostile_values)
def test_any_hostile_field_gives_a_decode_error_or_a_result_never_a_crash(
        key: str, etype: str, value: Any, content_key: str, content_value: Any) -> None:
    content = {"msgtype": "m.text", "body": "x", "membership": "join", "m.relates_to": {
        "rel_type": "m.annotation", "event_id": "$t", "key": "+"}, "redacts": "$t", content_key: content_value}
    event = {**ev(etype, content), key: value}
    if etype in ("m.room.member", "m.room.power_levels") and key != "state_key":
        event.setdefault("state_key", ALICE if etype == "m.room.member" else "")
    try:
        dec(event)
    except D.MatrixDecodeError as exc:
        assert exc.reason in (D.MALFORMED, D.BAD_ID, D.BAD_NUMBER, D.SCHEMA_LIMIT)
    D.decode_policy_rule(event) if isinstance(event.get("content"), dict) else None
