"""The public moderation log: what an entry keeps, and what the world sees of it.

Pure (no I/O). The pipeline calls ``entry`` inside its transaction to make the
row it stores; ``GET /v1/moderation-log`` calls ``public`` on every row it
serves. A person appears only as their identity level allows
(docs/operations.md, "The public moderation log"):

* the member an action is about (the subject): identified or pseudonymous, by
  their name and the gateway id the linked platforms show them by (``cga_``);
  anonymous, as "an anonymous member", with no id, no name and no token at all,
  so that two entries about them cannot be joined to each other or to anything
  else;
* the moderator: by name only when identified, otherwise by role ("a moderator
  of group g on p"): a moderator acts for their group.

Both halves apply the rule. ``entry`` stores no name the level does not allow;
``public`` decides again from the stored level, and a row with no level (one
written before there were levels in the log) shows no person at all. The
``reason`` is the moderator's own text: the names and ids the event gives for
an anonymous member or an unidentified moderator are cut out of it (it cannot
catch every way of describing someone, so moderators are asked not to).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from gateway.ids import EventId, GroupRef, LinkName
from gateway.store.base import ModerationEntry
from schemas.v1 import Actor

SHOWN = frozenset({"pseudonymous", "identified"})
"""Levels whose name and gateway id the log may show for the subject."""
MESSAGE_PREFIX = "cgm_"
"""Canonical message ids start so (``gateway.ids.new_message_id``); other subjects are people."""


def entry(*, time: float, link: LinkName, source: GroupRef, action: str, event_id: EventId, subject: str,
          member: Actor | None, moderator: Actor | None, reason: str | None,
          category: str | None) -> ModerationEntry:
    """The row to store for one action in one link. ``subject`` is the canonical
    id of the message or member acted on; ``member`` and ``moderator`` are the
    people as the event gives them, with the identity level they may be shown at
    (an anonymous stand-in stays anonymous whatever the event claims)."""
    subject_level = member.identity if member is not None else None
    hide: list[tuple[Iterable[str | None], str]] = []
    if member is not None and member.identity == "anonymous":
        hide.append(((member.id, member.name), "[an anonymous member]"))
    if moderator is not None and moderator.identity != "identified":
        hide.append(((moderator.id, moderator.name), "[a moderator]"))
    return ModerationEntry(
        time=time, link=link, platform=source.platform, grp=source.group, action=action, subject=subject,
        moderator=moderator.name if moderator is not None and moderator.identity == "identified" else None,
        reason=_cut(reason, hide), category=category, event_id=event_id,
        subject_identity=subject_level,
        subject_name=member.name if member is not None and member.identity in SHOWN else None,
        moderator_identity=moderator.identity if moderator is not None else None)


def public(e: ModerationEntry) -> dict[str, Any]:
    """The entry as ``GET /v1/moderation-log`` shows it. Not shown: the site's
    event id (a site may put anything in it, and on Matrix it names a room
    event that names the person) and the canonical id of an anonymous member
    or of a message."""
    level = e.subject_identity if e.subject_identity in ("anonymous", *SHOWN) else None
    if level in SHOWN:
        person = e.subject_name or f"a {level} member"
    elif level == "anonymous":
        person = "an anonymous member"
    else:
        person = "a member"  # no level: the log cannot tell what may be shown
    is_message = e.subject.startswith(MESSAGE_PREFIX)
    if is_message:
        subject = f"a message by {person}" if e.subject_identity else "a message"
    else:
        subject = person
    identified = e.moderator_identity == "identified" and e.moderator
    return {
        "seq": e.seq, "time": e.time, "link": e.link, "platform": e.platform, "grp": e.grp, "action": e.action,
        "subject": subject,
        "subject_identity": level,
        "subject_id": e.subject if level in SHOWN and not is_message else None,
        "moderator": e.moderator if identified else f"a moderator of group {e.grp} on {e.platform}",
        "reason": e.reason, "category": e.category,
    }


def _cut(text: str | None, hide: list[tuple[Iterable[str | None], str]]) -> str | None:
    """``text`` with each of the words to hide (whole words, any case) replaced by its label."""
    if not text:
        return text
    for words, label in hide:
        for word in sorted({w for w in words if w and len(w.strip()) > 1}, key=len, reverse=True):
            text = re.sub(rf"(?<!\w){re.escape(word.strip())}(?!\w)", label, text, flags=re.IGNORECASE)
    return text


__all__ = ["entry", "public"]
