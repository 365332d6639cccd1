"""The id map (``gateway.idmap``): references resolved once per event and once
per target, pending references completed at delivery, and the payload handed
to delivery in-process without a decode of what was just encoded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from gateway import ids
from gateway.idmap import Completion, IdMap, MessageRef, decode_pending, encode_pending
from gateway.ids import ACTOR, MESSAGE, CanonicalId, EventId, GroupId, GroupRef, NativeId, PlatformName
from gateway.store.base import OutboxItem, encode_payload
from gateway.store.sqlite import SqliteStore
from schemas.v1 import AccountRef, Actor, Message, MessageDeletion, Report

A = GroupRef(PlatformName("a"), GroupId("g-a"))
B = GroupRef(PlatformName("b"), GroupId("g-b"))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "ids.db"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def test_pending_has_one_storage_form_and_reads_back_typed() -> None:
    refs = (MessageRef(CanonicalId("cgm_1")), MessageRef(CanonicalId("cgm_2")))
    assert encode_pending(refs) == "cgm_1 cgm_2"  # as rows written before the id map
    assert decode_pending("cgm_1 cgm_2") == refs
    assert encode_pending(()) is None and decode_pending(None) == () and decode_pending("") == ()


async def test_every_reference_of_a_message_is_resolved_once_and_translated_per_target(store: SqliteStore) -> None:
    idmap = IdMap(b"k" * 32)

    def run(tx):  # type: ignore[no-untyped-def]
        # an earlier message, born on a, sent to b under its canonical id (b has not named its own yet)
        first = idmap.inbound(tx, A, "civic.message.created", Message(id="a-1", author=Actor(id="alice"), text="1"))
        assert idmap.new_message(tx, A, "a-1", first)
        assert idmap.outbound(tx, first, B).message == first.message
        reply = Message(id="a-2", author=Actor(id="alice"), text="2", reply_to="a-1", thread="never-seen",
                        mentions=(Actor(id="bob", name="Bob"),))
        refs = idmap.inbound(tx, A, "civic.message.created", reply)
        assert refs.reply_to == first.message and refs.thread is None and refs.unknown == ("thread_unknown",)
        assert refs.acting == first.acting  # the same person, the same canonical id
        assert idmap.new_message(tx, A, "a-2", refs)
        assert not idmap.new_message(tx, A, "a-2", refs)  # known already: an echo
        out = idmap.outbound(tx, refs, B)
        assert out.reply_to == first.message and out.pending == (first.message,)  # b may name its own first
        assert refs.acting is not None and out.acting == Actor(id=refs.acting.ref)  # b knows alice by a stand-in
        assert [m.name for m in out.mentions] == ["Bob"]
        return first, refs

    first, refs = await store.transact(run)
    # b named its own id for the first copy: the next event refers to it directly
    await store.complete([], Completion(store).learned(B, {first.message: NativeId("b-1")}))

    def again(tx):  # type: ignore[no-untyped-def]
        out = idmap.outbound(tx, refs, B)
        return out.reply_to, out.pending

    assert await store.transact(again) == ("b-1", ())


async def test_a_reference_the_target_never_saw(store: SqliteStore) -> None:
    idmap = IdMap(b"k" * 32)

    def run(tx):  # type: ignore[no-untyped-def]
        tx.map("a", "g-a", MESSAGE, "a-9", CanonicalId("cgm_9"), ids.ORIGIN)  # born on a, never copied to b
        deletion = idmap.inbound(tx, A, "civic.message.deleted", MessageDeletion(id="a-9", by=Actor(id="mod")))
        report = idmap.inbound(tx, A, "civic.report.filed",
                               Report(category="spam", message="a-9", reporter=Actor(id="r", identity="anonymous")))
        return idmap.outbound(tx, deletion, B), idmap.outbound(tx, report, B)

    deletion, report = await store.transact(run)
    assert deletion.missing  # a deletion of what b never had cannot go there
    assert not report.missing and report.message is None  # a report may name less
    assert report.acting is None  # an anonymous reporter never crosses


async def test_a_move_needs_the_new_accounts_word(store: SqliteStore) -> None:
    idmap = IdMap(b"k" * 32)

    def run(tx):  # type: ignore[no-untyped-def]
        alice = idmap.inbound(tx, A, "civic.message.created", Message(id="x", author=Actor(id="alice"), text=""))
        assert alice.acting is not None
        to = AccountRef(platform="b", id="alice@b")
        assert not idmap.move(tx, A, "alice", to, alice.acting.ref)
        idmap.declare_aliases(tx, B, "alice@b", [AccountRef(platform="a", id="alice")], 1.0)
        assert idmap.move(tx, A, "alice", to, alice.acting.ref)
        return alice.acting.ref, tx.lookup("b", "", ACTOR, "alice@b")

    ref, row = await store.transact(run)
    assert row == (ref, ids.ORIGIN)


class Natives:
    """A store that answers ``natives`` and counts the calls."""

    def __init__(self, rows: dict[str, str]) -> None:
        self.rows = rows
        self.calls = 0

    async def natives(self, platform: str, grp: str, kind: str,
                      canonicals: Sequence[str]) -> dict[str, tuple[NativeId, int]]:
        self.calls += 1
        return {c: (NativeId(self.rows[c]), ids.COPY) for c in canonicals if c in self.rows}


def item(payload: object, pending: str | None, body: bytes | None = None, decoded: object = None) -> OutboxItem:
    return OutboxItem(1, B, EventId("e"), "civic.message.created", PlatformName("a"), 1.0, pending,
                      encode_payload(payload) if body is None else body, None, decoded)


async def test_delivery_completes_pending_references_and_remembers_what_targets_named() -> None:
    natives = Natives({"cgm_1": "b-1"})
    done = Completion(natives)  # type: ignore[arg-type]
    m = Message(id="cgm_2", author=Actor(id="x"), text="t", reply_to="cgm_1")
    [got] = await done.payloads([item(m, "cgm_1")])
    assert got.reply_to == "b-1" and got.id == "cgm_2" and natives.calls == 1
    done.learned(B, {"cgm_2": NativeId("b-2")})
    [got] = await done.payloads([item(Message(id="x", author=Actor(id="x"), text="t", reply_to="cgm_2"), "cgm_2")])
    assert got.reply_to == "b-2" and natives.calls == 1  # from what the last delivery reported


async def test_an_item_made_in_this_process_is_not_decoded_again() -> None:
    m = Message(id="cgm_2", author=Actor(id="x"), text="t")
    [got] = await Completion(Natives({})).payloads([item(m, None, body=b"\xc1 not msgpack", decoded=m)])  # type: ignore[arg-type]
    assert got is m
    with pytest.raises(Exception):  # read back from the store, the same body would be decoded
        await Completion(Natives({})).payloads([item(m, None, body=b"\xc1 not msgpack")])  # type: ignore[arg-type]
