"""The public moderation log, and every other page anyone may fetch, shows a
person only as their identity level allows (docs/operations.md, "The public
moderation log"). Tested as an outsider: two webhook sites linked in two links
through a real gateway on 127.0.0.1, bans, kicks, removals and reports by and
of people at each identity level, then every GET route of the gateway's router
fetched without a token and searched for anything that names an anonymous
person. Also as an attacker: can two entries about one anonymous person be
joined by anything they share?"""

from __future__ import annotations

import re
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway import transparency
from gateway.ids import ACTOR, EventId, GroupId, GroupRef, LinkName, PlatformName
from gateway.store.base import Tx
from gateway.store.postgresql import PostgresStore
from gateway.store.postgresql import migrations as pg_migrations
from gateway.store.sqlite import migrations as sqlite_migrations
from tests.conftest import Net, start_net, stop_net
from tests.services import temp_database
from schemas.v1 import Actor
from tests.sitekit import Sender, Site, wait_for

LINKS = ('[[links]]\nname = "one"\ngroups = [{platform = "a", group = "g-a"}, {platform = "b", group = "g-b1"}]\n'
         '[[links]]\nname = "two"\ngroups = [{platform = "a", group = "g-a"}, {platform = "b", group = "g-b2"}]\n')


def who(pid: str, name: str, identity: str) -> dict[str, str]:
    return {"id": pid, "name": name, "identity": identity}


# people of site a
ANON = who("a-anon-7f3k", "Anouk Anoniem", "anonymous")
PSEUDO = who("a-pseudo-44q", "Pim Pseudoniem", "pseudonymous")
IDENT = who("a-ident-12z", "Ida Identified", "identified")
MOD_ANON = who("a-mod-anon-5r", "Maarten Geheim", "anonymous")
MOD_PSEUDO = who("a-mod-ps-6t", "Mona Moderatrix", "pseudonymous")
MOD_IDENT = who("a-mod-id-8w", "Dr. Iris Moderator", "identified")
REP_ANON = who("a-rep-anon-9u", "Rita Stil", "anonymous")
# people of site b
B_ANON = who("b-shy-91xk", "Sjoerd Schuw", "anonymous")
B_MOD_ANON = who("b-mod-anon-3p", "Bas Verborgen", "anonymous")
B_MOD_IDENT = who("b-mod-id-2m", "Ir. Bea Beheer", "identified")

ANONYMOUS = {"a": [ANON, MOD_ANON, REP_ANON], "b": [B_ANON, B_MOD_ANON]}
KNOWN_PUBLIC = {"/metrics", "/healthz", "/readyz", "/v1/moderation-log"}
"""GET routes anyone may fetch; a route the router has beyond these and the
admin API fails the test until it is added here (and so scanned)."""


async def _send(sender: Sender, type_: str, group: str, data: dict[str, Any]) -> None:
    status, body = await sender.send([sender.event(type_, group, data)])
    assert status == 202, body


def _texts(site: Site, group: str) -> dict[str, dict[str, Any]]:
    return {e["data"]["text"]: e["data"] for e in site.of_type("civic.message.created") if e["subject"] == group}


async def _seen(site: Site, group: str, text: str) -> dict[str, Any]:
    await wait_for(lambda: text in _texts(site, group), what=f"{text!r} in {site.name}/{group}")
    return _texts(site, group)[text]


class Cases:
    """Moderation sent through the gateway, each with a unique marker in its
    reason so that the test can tell which log entries it made."""

    def __init__(self) -> None:
        self.subject: dict[str, dict[str, str]] = {}
        self.moderator: dict[str, dict[str, str]] = {}
        self._n = 0

    def new(self, subject: dict[str, str], moderator: dict[str, str]) -> str:
        self._n += 1
        marker = f"case-{self._n:02d}"
        self.subject[marker] = subject
        self.moderator[marker] = moderator
        return marker


async def _moderate_everyone(net: Net) -> tuple[Cases, dict[str, str]]:
    """Posts, then bans, kicks, removals and reports by and of people at each
    level, on both sites. Returns the cases and the stand-ins the sites saw."""
    a, b = net.sites["a"], net.sites["b"]
    sa, sb = net.senders["a"], net.senders["b"]
    for n, author in enumerate((ANON, PSEUDO, IDENT, ANON)):
        await _send(sa, "civic.message.created", "g-a", {"id": f"a-post-{n}", "author": author, "text": f"a says {n}"})
    await _send(sb, "civic.message.created", "g-b1", {"id": "b-post-1", "author": B_ANON, "text": "b says 1"})
    await _send(sb, "civic.message.created", "g-b2", {"id": "b-post-2", "author": B_ANON, "text": "b says 2"})
    shown = {  # each person as the other site was shown them
        "anon@g-b1": (await _seen(b, "g-b1", "a says 0"))["author"],
        "anon@g-b2": (await _seen(b, "g-b2", "a says 0"))["author"],
        "pseudo@g-b2": (await _seen(b, "g-b2", "a says 1"))["author"],
        "b_anon@g-a": (await _seen(a, "g-a", "b says 1"))["author"],
    }
    seen = {k: v["id"] for k, v in shown.items()}
    await _seen(b, "g-b1", "a says 3")
    assert seen["anon@g-b1"] != seen["anon@g-b2"]  # the premise: per-group stand-ins

    cases = Cases()
    # on a: every moderator level acts on every subject level
    for subject in (ANON, PSEUDO, IDENT):
        for mod in (MOD_ANON, MOD_PSEUDO, MOD_IDENT):
            await _send(sa, "civic.moderation.action", "g-a", {
                "action": "kick", "member": subject, "by": mod, "category": "harassment",
                "reason": f"{cases.new(subject, mod)}: rule 3"})
    # a reason that names the anonymous person: the log must not repeat her name or id
    await _send(sa, "civic.moderation.action", "g-a", {
        "action": "ban", "member": ANON, "by": MOD_ANON, "category": "spam",
        "reason": f"{cases.new(ANON, MOD_ANON)}: Anouk Anoniem (a-anon-7f3k) keeps posting spam, says Maarten Geheim"})
    await _send(sa, "civic.moderation.action", "g-a", {
        "action": "remove_message", "message": "a-post-3", "member": ANON, "by": MOD_PSEUDO, "category": "spam",
        "reason": f"{cases.new(ANON, MOD_PSEUDO)}: rule 3"})
    await _send(sa, "civic.membership.changed", "g-a", {
        "member": PSEUDO, "state": "banned", "by": MOD_IDENT, "reason": f"{cases.new(PSEUDO, MOD_IDENT)}: rule 3"})
    await _send(sa, "civic.moderation.action", "g-a", {
        "action": "kick", "member": {"id": seen["b_anon@g-a"]}, "by": MOD_IDENT, "category": "harassment",
        "reason": f"{cases.new(B_ANON, MOD_IDENT)}: rule 3"})
    # on b: its moderators act on a's people through the stand-ins b knows, and on b's own
    await _send(sb, "civic.moderation.action", "g-b1", {
        "action": "kick", "member": shown["anon@g-b1"], "by": B_MOD_ANON, "category": "harassment",
        "reason": f"{cases.new(ANON, B_MOD_ANON)}: rule 3"})
    await _send(sb, "civic.membership.changed", "g-b2", {  # by id alone: still anonymous
        "member": {"id": seen["anon@g-b2"]}, "state": "banned", "by": B_MOD_IDENT,
        "reason": f"{cases.new(ANON, B_MOD_IDENT)}: rule 3"})
    await _send(sb, "civic.moderation.action", "g-b2", {
        "action": "kick", "member": shown["pseudo@g-b2"], "by": B_MOD_ANON, "category": "harassment",
        "reason": f"{cases.new(PSEUDO, B_MOD_ANON)}: rule 3"})
    await _send(sb, "civic.moderation.action", "g-b1", {
        "action": "ban", "member": B_ANON, "by": B_MOD_IDENT, "category": "spam",
        "reason": f"{cases.new(B_ANON, B_MOD_IDENT)}: rule 3"})
    await _send(sb, "civic.moderation.action", "g-b2", {
        "action": "kick", "member": B_ANON, "by": B_MOD_ANON, "category": "spam",
        "reason": f"{cases.new(B_ANON, B_MOD_ANON)}: rule 3"})
    # reports by and of people at each level (they reach the moderators, never the log)
    for reporter in (REP_ANON, PSEUDO, IDENT):
        for target in ({"member": ANON, "message": "a-post-0"}, {"member": IDENT}, {"member": {"id": seen["b_anon@g-a"]}}):
            await _send(sa, "civic.report.filed", "g-a", {"category": "harassment", "text": "please look",
                                                          "reporter": reporter, **target})
    await _send(sb, "civic.report.filed", "g-b1", {"category": "spam", "member": {"id": seen["anon@g-b1"]},
                                                   "reporter": B_ANON, "text": "please look"})
    await wait_for(lambda: len(b.of_type("civic.report.filed")) >= 9, what="the reports reach b")
    return cases, seen


async def _identifiers(net: Net, people: dict[str, list[dict[str, str]]]) -> dict[str, set[str]]:
    """Every identifier the gateway has for each person: native id and name,
    canonical id, and every id the store maps to that (stand-ins, ghosts)."""
    def run(tx: Tx) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for platform, persons in people.items():
            for p in persons:
                hit = tx.lookup(PlatformName(platform), "", ACTOR, p["id"])
                assert hit is not None, p
                found = {p["id"], p["name"], hit[0]}
                found.update(native for _pl, _g, native, _how in tx.copies(hit[0], ACTOR))
                out[p["id"]] = found
        return out
    return await net.gw.store.transact(run)


async def _public_pages(net: Net) -> dict[str, str]:
    """Every page of every GET route of the gateway's router, fetched without a
    token (the moderation log also per link and page by page)."""
    assert net.gw._runner is not None
    paths: list[str] = []
    for route in net.gw._runner.app.router.routes():
        if route.method != "GET":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path")
        assert path is not None, f"a GET route with parameters the test does not fetch: {info}"
        assert path in KNOWN_PUBLIC or path.startswith("/admin/"), f"a GET route the test does not know: {path}"
        paths.append(path)
    assert KNOWN_PUBLIC <= set(paths)
    pages: dict[str, str] = {}
    async with aiohttp.ClientSession() as s:
        async def get(url: str) -> str:
            async with s.get(net.url + url) as resp:
                text = await resp.text()
                if url.startswith("/admin/"):
                    assert resp.status == 401, (url, resp.status)  # not public: no token, nothing served
                else:
                    assert resp.status == 200, (url, resp.status, text)
                pages[url] = text
                return text
        for path in paths:
            await get(path)
        for query in ("?link=one", "?link=two", "?limit=1000"):
            await get("/v1/moderation-log" + query)
        seqs = [e["seq"] for e in (await _log(net))]
        for after in [0, *seqs]:
            await get(f"/v1/moderation-log?after={after}&limit=1")
    return pages


async def _log(net: Net) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{net.url}/v1/moderation-log?limit=1000") as resp:
            assert resp.status == 200
            return (await resp.json())["entries"]


def _tokens(entry: dict[str, Any]) -> set[str]:
    """What a reader could match one entry to another by: every word and id in
    its text fields (seq and time are unique to the entry)."""
    return {t.lower() for k, v in entry.items() if isinstance(v, str) for t in re.findall(r"[\w\-\[\]@.:]+", v)}


def _leaks(pages: dict[str, str], identifiers: Iterable[str]) -> list[tuple[str, str]]:
    return [(ident, url) for url, text in pages.items() for ident in identifiers if ident.lower() in text.lower()]


async def test_public_pages_show_no_anonymous_person_and_moderators_by_role(tmp_path: Path) -> None:
    net = await start_net(tmp_path, ["a", "b"], links=LINKS)
    try:
        cases, seen = await _moderate_everyone(net)
        ids = await _identifiers(net, ANONYMOUS)
        # the collection found the stand-ins the sites saw (else the scan below proves little)
        assert {seen["anon@g-b1"], seen["anon@g-b2"]} <= ids[ANON["id"]]
        assert seen["b_anon@g-a"] in ids[B_ANON["id"]]
        assert any(i.startswith("cga_") for i in ids[ANON["id"]])
        # native id, name, canonical id and at least one ghost (an anonymous reporter never crosses: no ghost)
        assert {p["id"]: len(ids[p["id"]]) >= 4 for ps in ANONYMOUS.values() for p in ps} \
            == {p["id"]: p is not REP_ANON for ps in ANONYMOUS.values() for p in ps}
        by_role = await _identifiers(net, {"a": [MOD_PSEUDO]})  # a pseudonymous moderator shows by role only

        pages = await _public_pages(net)
        assert _leaks(pages, {i for s in ids.values() for i in s}) == []
        assert _leaks(pages, by_role[MOD_PSEUDO["id"]]) == []

        log = await _log(net)
        entries: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in log:
            entries[e["reason"].split(":")[0]].append(e)
        assert set(entries) == set(cases.subject)  # every case logged, reports not
        for marker, found in entries.items():
            links = {"g-a": ["one", "two"], "g-b1": ["one"], "g-b2": ["two"]}[found[0]["grp"]]
            assert sorted(e["link"] for e in found) == links, marker  # once per link of the group

        # what each entry shows, by level
        for marker, found in entries.items():
            subject, mod = cases.subject[marker], cases.moderator[marker]
            for e in found:
                if subject["identity"] == "anonymous":
                    assert e["subject"] in ("an anonymous member", "a message by an anonymous member"), e
                    assert e["subject_identity"] == "anonymous" and e["subject_id"] is None, e
                else:
                    assert e["subject"] == subject["name"] and e["subject_identity"] == subject["identity"], e
                    assert e["subject_id"] and e["subject_id"].startswith("cga_"), e
                if mod["identity"] == "identified":
                    assert e["moderator"] == mod["name"], e
                else:
                    assert e["moderator"] == f"a moderator of group {e['grp']} on {e['platform']}", e
                assert "event_id" not in e
        # the identified are named, so the scan above could have found names
        text = str(log)
        for name in ("Ida Identified", "Pim Pseudoniem", "Dr. Iris Moderator", "Ir. Bea Beheer"):
            assert name in text
        # a pseudonymous person is shown by the id the linked groups know them by
        assert {e["subject_id"] for m, es in entries.items() for e in es if cases.subject[m] is PSEUDO} \
            == {seen["pseudo@g-b2"]}
        named = entries["case-10"][0]["reason"]
        assert named == "case-10: [an anonymous member] ([an anonymous member]) keeps posting spam, says [a moderator]"

        # no two entries about one anonymous person (as subject or moderator)
        # share anything that entries about other people do not also have
        for person in (p for ps in ANONYMOUS.values() for p in ps):
            mine = [m for m in entries if person in (cases.subject[m], cases.moderator[m])]
            others = set().union(*(_tokens(e) for m in entries if m not in mine for e in entries[m]))
            assert mine or person is REP_ANON
            for i, m1 in enumerate(mine):
                for m2 in mine[i + 1:]:
                    for e1 in entries[m1]:
                        for e2 in entries[m2]:
                            shared = _tokens(e1) & _tokens(e2)
                            assert shared <= others, (person["id"], m1, m2, shared - others)
    finally:
        await stop_net(net)


# -- entries written before the log knew identity levels ------------------------------------

OLD_ROW = ("ban", "cga_0195a1b2c3d4e5f60718293a", "Maarten Geheim", "rule 3", "ban-of-a-anon-7f3k")


def _old_sqlite_database(path: Path) -> None:
    """A database as the gateway left it before migration 0007, with one log row."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
    for version, sql in sqlite_migrations():
        if version >= 7:
            break
        conn.executescript(sql.replace("DOUBLE PRECISION", "REAL"))
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
    action, subject, moderator, reason, event_id = OLD_ROW
    conn.execute("INSERT INTO moderation_log (time, link, platform, grp, action, subject, moderator, reason,"
                 " event_id) VALUES (1.0, 'one', 'a', 'g-a', ?, ?, ?, ?, ?)",
                 (action, subject, moderator, reason, event_id))
    conn.commit()
    conn.close()


async def test_entries_stored_before_the_upgrade_show_no_person(tmp_path: Path) -> None:
    _old_sqlite_database(tmp_path / "gw.db")  # where start_net puts the gateway's database
    net = await start_net(tmp_path, ["a", "b"], links=LINKS)
    try:
        [entry] = await _log(net)
        pages = await _public_pages(net)
        assert entry["subject"] == "a member" and entry["subject_id"] is None
        assert entry["moderator"] == "a moderator of group g-a on a" and entry["reason"] == "rule 3"
        assert _leaks(pages, OLD_ROW[1:3] + OLD_ROW[4:]) == []
        [stored] = await net.gw.store.moderation_log()
        assert stored.moderator is None  # the name itself is gone from the database
    finally:
        await stop_net(net)


async def test_postgresql_entries_stored_before_the_upgrade_show_no_person() -> None:
    with temp_database() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                               " applied DOUBLE PRECISION NOT NULL)")
            for version, sql in pg_migrations():
                if version >= 7:
                    break
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, 0)", version)
            action, subject, moderator, reason, event_id = OLD_ROW
            await conn.execute("INSERT INTO moderation_log (time, link, platform, grp, action, subject, moderator,"
                               " reason, event_id) VALUES (1.0, 'one', 'a', 'g-a', $1, $2, $3, $4, $5)",
                               action, subject, moderator, reason, event_id)
        finally:
            await conn.close()
        store = PostgresStore(dsn)
        await store.open()
        try:
            [stored] = await store.moderation_log()
        finally:
            await store.close()
    assert stored.moderator is None and stored.subject_identity is None
    shown = transparency.public(stored)  # what GET /v1/moderation-log serves for it
    assert shown["subject"] == "a member" and shown["subject_id"] is None
    assert shown["moderator"] == "a moderator of group g-a on a"
    assert not any(s in str(shown) for s in OLD_ROW[1:3] + OLD_ROW[4:])


@pytest.mark.parametrize("member, by, subject, moderator", [
    ({"id": "x", "name": "Xena", "identity": "identified"}, {"id": "m", "name": "Mo", "identity": "identified"},
     "Xena", "Mo"),
    ({"id": "x", "identity": "pseudonymous"}, None, "a pseudonymous member", "a moderator of group g on p"),
    ({"id": "x", "name": "Xena", "identity": "anonymous"}, {"id": "m", "name": "Mo", "identity": "pseudonymous"},
     "an anonymous member", "a moderator of group g on p"),
])
def test_each_level_as_the_log_shows_it(member: dict[str, Any], by: dict[str, Any] | None, subject: str,
                                        moderator: str) -> None:
    e = transparency.entry(time=1.0, link=LinkName("l"), source=GroupRef(PlatformName("p"), GroupId("g")),
                           action="ban", event_id=EventId("e"), subject="cga_1", member=Actor(**member),
                           moderator=Actor(**by) if by else None, reason="Xena said so", category=None)
    shown = transparency.public(e)
    assert (shown["subject"], shown["moderator"]) == (subject, moderator)
    assert shown["subject_id"] == (None if member["identity"] == "anonymous" else "cga_1")
    assert ("Xena" in str(shown)) == (member["identity"] != "anonymous")
    if member["identity"] == "anonymous":
        assert e.subject_name is None and "Xena" not in str(e)  # not even stored
