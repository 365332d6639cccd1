"""Gateway -> Matrix: deliver schema events into a room, as the right ghost.

Ids arrive already translated by the core: a message the room has is named by
its Matrix event id (``$...``); a person is either their own Matrix user id
(``@...``, someone who lives on this homeserver) or the gateway's stand-in id
for them (``cga_...``, or ``anon_...`` per group for an anonymous person),
which becomes a ghost ``@<ghost_prefix><escaped id>:<server_name>``.

Ghosts are registered lazily, the first time they act (``Ghosts.ensure``):
registered, display name set as their identity level allows, invited by the
bot when the room is not public, and joined. What was done is remembered in
memory; after a restart it is done again, which the homeserver answers
harmlessly (``M_USER_IN_USE``, a join of a member).

Every send uses the delivery's event id as its transaction id, so a retried
delivery gets the same Matrix event back instead of a second copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from adapters.matrix import encode
from adapters.matrix.homeserver import MatrixClient, MatrixError, delivery_error
from adapters.matrix.config import MatrixConfig
from adapters.matrix.decode import is_ghost
from adapters.matrix.media import mxc_of_public
from gateway.kit import Delivery, FetchError, GuardedSession, PermanentDeliveryError, TransientDeliveryError
from schemas.v1 import (
    AccountMove,
    Actor,
    Attachment,
    Membership,
    Message,
    MessageDeletion,
    ModerationAction,
    ProfileUpdate,
    Reaction,
    Report,
)

log = logging.getLogger("civic.matrix")

CACHE_MAX = 100_000
NOT_COPIED = object()
"""``Outbound._upload``: the attachment stays where it is; the message links to it."""
REFUSED = object()
"""``Outbound._upload``: the gateway may not fetch the attachment's URL; the message only names it."""
GHOST_LEVEL = {"member": 0, "moderator": 50, "admin": 50}
"""Power level a ghost gets for a role elsewhere. A remote admin becomes a
moderator here: only the room's own people are its admins."""


def is_matrix_user(actor_id: str) -> bool:
    return actor_id.startswith("@") and ":" in actor_id


def is_event_id(native: str | None) -> bool:
    return isinstance(native, str) and native.startswith("$")


class Ghosts:
    """The users that stand for people of other platforms."""

    def __init__(self, client: MatrixClient, config: MatrixConfig) -> None:
        self.client = client
        self.config = config
        self._registered: set[str] = set()
        self._names: dict[str, str] = {}
        self._joined: set[tuple[str, str]] = set()
        self.registrations = 0

    def user_id(self, actor: Actor) -> str:
        """The Matrix user for ``actor``: their own account here, else their ghost."""
        if is_matrix_user(actor.id) and not is_ghost(actor.id, ghost_prefix=self.config.ghost_prefix,
                                                     server_name=self.config.server_name):
            return actor.id
        return self.speaker(actor)

    def speaker(self, actor: Actor) -> str:
        """Who sends for ``actor``: their ghost (the appservice cannot speak for
        a real user of the homeserver, so a person who lives here too is shown
        by a ghost with their name)."""
        local = encode.ghost_localpart(self.config.ghost_prefix, actor.id)
        return f"@{local}:{self.config.server_name}"

    async def ensure(self, actor: Actor, room: str) -> str:
        """``actor``'s ghost, registered, named and in ``room``."""
        user = self.speaker(actor)
        await self._register(user)
        await self.name(user, actor)
        await self.join(user, room)
        return user

    async def _register(self, user: str) -> None:
        if user in self._registered:
            return
        await self.client.register(user[1:].split(":", 1)[0])
        self.registrations += 1
        _bounded_add(self._registered, user)

    async def name(self, user: str, actor: Actor) -> None:
        name = encode.member_display_name(actor)
        if self._names.get(user) == name:
            return
        await self.client.set_display_name(user, name)
        if len(self._names) > CACHE_MAX:
            self._names.clear()
        self._names[user] = name

    async def join(self, user: str, room: str) -> None:
        if (room, user) in self._joined:
            return
        try:
            await self.client.join(room, user)
        except MatrixError as exc:
            if exc.errcode != "M_FORBIDDEN":
                raise
            await self.client.invite(room, user)  # a private room: the bot lets its ghost in
            await self.client.join(room, user)
        _bounded_add(self._joined, (room, user))

    def registered(self, user: str) -> bool:
        return user in self._registered

    def left(self, user: str, room: str) -> None:
        self._joined.discard((room, user))


class Outbound:
    """Delivers one ``Delivery`` at a time into its room (the group is the room id)."""

    def __init__(self, client: MatrixClient, config: MatrixConfig, fetcher: GuardedSession, media_key: bytes,
                 media_base: str, on_degrade: Callable[[str], None] = lambda reason: None) -> None:
        self.client = client
        self.config = config
        self.ghosts = Ghosts(client, config)
        self.fetcher = fetcher
        self.media_key = media_key
        self.media_base = media_base
        self.uploads: dict[str, str] = {}
        """Attachment URL -> mxc URI already uploaded (so a retry does not upload twice)."""
        self.degraded: dict[str, int] = {}
        """What could not be carried as it was, by reason (also reported through ``on_degrade``)."""
        self.on_degrade = on_degrade

    async def deliver(self, d: Delivery) -> dict[str, str]:
        """Send ``d``; the native ids made (gateway id -> Matrix event id)."""
        handler = getattr(self, "_" + d.type.removeprefix("civic.").replace(".", "_"))
        try:
            result: dict[str, str] = await handler(d, d.payload)
            return result
        except MatrixError as exc:
            raise delivery_error(exc, f"{d.type} into {d.group}") from None

    def _degrade(self, reason: str) -> None:
        self.degraded[reason] = self.degraded.get(reason, 0) + 1
        self.on_degrade(reason)

    # -- messages -----------------------------------------------------------------------------
    async def _message_created(self, d: Delivery, msg: Message) -> dict[str, str]:
        room = d.group
        user = await self.ghosts.ensure(msg.author, room)
        reply = msg.reply_to if is_event_id(msg.reply_to) else None
        thread = msg.thread if is_event_id(msg.thread) else None
        mentions = [self.ghosts.user_id(m) for m in msg.mentions]
        first: str | None = None
        notes: list[str] = []
        uploaded: list[tuple[Attachment, str]] = []
        for att in msg.attachments:
            mxc = await self._upload(att, user)
            if isinstance(mxc, str):
                uploaded.append((att, mxc))
            elif mxc is NOT_COPIED:  # what could not be copied travels as a link in the text
                notes.append(f"{_label(att)}: {att.url}")
            else:  # a URL the gateway may not fetch is not shown to the room either
                notes.append(f"[attachment not copied: {_label(att)}]")
        text_msg = msg
        if notes:
            lines = "\n".join(notes)
            text_msg = _with_text(msg, f"{msg.text}\n\n{lines}" if msg.text else lines)
        if text_msg.text or text_msg.html or not uploaded:
            content = encode.message_content(text_msg, reply_to_event=reply, thread_root=thread,
                                             mention_users=mentions,
                                             pills=[(u, m.name or "") for u, m in zip(mentions, msg.mentions)])
            first = await self.client.send(room, "m.room.message", content, f"{d.event_id}.0", user=user, ts=d.time)
        for i, (att, mxc) in enumerate(uploaded, start=1):
            content = encode.attachment_content(att, mxc_url=mxc, reply_to_event=reply, thread_root=thread)
            if msg.warning and first is None:  # an attachment alone still carries the warning
                content["body"] = f"CW: {msg.warning}\n\n{content['body']}"
            event_id = await self.client.send(room, "m.room.message", content, f"{d.event_id}.{i}", user=user,
                                              ts=d.time)
            first = first or event_id
        assert first is not None
        return {msg.id: first}

    async def _upload(self, att: Attachment, user: str) -> str | object:
        """The mxc URI of ``att`` in the homeserver's repository; ``NOT_COPIED``
        when it cannot be copied (too large, not found there): then it travels as
        a link; ``REFUSED`` when the gateway may not fetch its URL at all (an
        address of its own network in any spelling, not an http(s) URL, not a
        valid URL): then only its name is shown. Either way the message goes on
        without it, at once (retrying cannot change the answer)."""
        if att.url.startswith("mxc://"):
            return att.url
        own = mxc_of_public(self.media_base, self.media_key, att.url)
        if own is not None:
            return own
        if att.url in self.uploads:
            return self.uploads[att.url]
        if att.size is not None and att.size > self.config.media_max_bytes:
            self._degrade("media_too_large")
            return NOT_COPIED
        try:
            got = await self.fetcher.request("GET", att.url, max_bytes=self.config.media_max_bytes)
            if got.status != 200:
                raise FetchError(f"{att.url}: HTTP {got.status}", transient=got.status >= 500 or got.status in (408, 429),
                                 status=got.status)
            data, content_type = got.body, got.content_type or "application/octet-stream"
        except FetchError as exc:
            if exc.transient:
                raise TransientDeliveryError(f"attachment {exc}") from None
            if exc.status == 0:  # no answer because the URL itself was refused
                log.info("attachment not copied into Matrix, its URL refused: %s", exc)
                self._degrade("media_refused")
                return REFUSED
            log.info("attachment not copied into Matrix, sent as a link: %s", exc)
            self._degrade("media_not_copied")
            return NOT_COPIED
        mxc = await self.client.upload(data, att.media_type or content_type, att.name, user=user)
        if len(self.uploads) > CACHE_MAX:
            self.uploads.clear()
        self.uploads[att.url] = mxc
        return mxc

    async def _message_edited(self, d: Delivery, msg: Message) -> dict[str, str]:
        if not is_event_id(msg.id):
            raise PermanentDeliveryError(f"edit of {msg.id}, which the room {d.group} never got")
        user = await self.ghosts.ensure(msg.author, d.group)
        content = encode.edit_content(msg, target_event=msg.id,
                                      mention_users=[self.ghosts.user_id(m) for m in msg.mentions])
        await self.client.send(d.group, "m.room.message", content, d.event_id, user=user, ts=d.time)
        return {}

    async def _message_deleted(self, d: Delivery, p: MessageDeletion) -> dict[str, str]:
        await self._redact(d, p.id, encode.redaction_reason(p), as_author=p.by is None)
        return {}

    async def _redact(self, d: Delivery, target: str, reason: str | None, *, as_author: bool) -> None:
        """Redact ``target``: as its ghost when its author deletes it, else as the bot."""
        if not is_event_id(target):
            raise PermanentDeliveryError(f"removal of {target}, which the room {d.group} never got")
        by: str | None = None
        if as_author:
            event = await self.client.event(d.group, target)
            sender = event.get("sender") if event else None
            if isinstance(sender, str) and is_ghost(sender, ghost_prefix=self.config.ghost_prefix,
                                                    server_name=self.config.server_name):
                by = sender
        await self.client.redact(d.group, target, d.event_id, reason, user=by)

    # -- reactions -----------------------------------------------------------------------------
    async def _reaction_added(self, d: Delivery, r: Reaction) -> dict[str, str]:
        if not is_event_id(r.message):
            raise PermanentDeliveryError(f"reaction to {r.message}, which the room {d.group} never got")
        user = await self.ghosts.ensure(r.author, d.group)
        await self.client.send(d.group, "m.reaction", encode.reaction_content(r.message, r.key), d.event_id,
                               user=user, ts=d.time)
        return {}

    async def _reaction_removed(self, d: Delivery, r: Reaction) -> dict[str, str]:
        if not is_event_id(r.message):
            raise PermanentDeliveryError(f"reaction to {r.message}, which the room {d.group} never got")
        user = self.ghosts.speaker(r.author)
        for event in await self.client.relations(d.group, r.message, "m.annotation", "m.reaction"):
            rel = (event.get("content") or {}).get("m.relates_to") or {}
            if event.get("sender") == user and rel.get("key") == r.key and isinstance(event.get("event_id"), str):
                await self.client.redact(d.group, event["event_id"], d.event_id, None, user=user)
                break
        else:
            self._degrade("reaction_not_found")
        return {}

    # -- people ---------------------------------------------------------------------------------
    async def _membership_changed(self, d: Delivery, m: Membership) -> dict[str, str]:
        room, reason = d.group, m.reason
        own = self._own(m.member)
        if m.state == "joined":
            if not own:
                await self.ghosts.ensure(m.member, room)
        elif m.state == "left":
            if not own:
                user = self.ghosts.speaker(m.member)
                await self._tolerate(self.client.leave(room, user, reason), "M_FORBIDDEN")
                self.ghosts.left(user, room)
        elif m.state in ("kicked", "banned", "unbanned"):
            await self._member_action({"kicked": "kick", "banned": "ban", "unbanned": "unban"}[m.state], room,
                                      m.member, reason)
        elif m.state == "role_changed" and m.role is not None and not own:
            await self._set_level(room, self.ghosts.speaker(m.member), GHOST_LEVEL[m.role])
        else:
            self._degrade(f"membership_{m.state}_not_carried")
        return {}

    def _own(self, actor: Actor) -> bool:
        """Whether ``actor`` is a user of the homeserver itself (not a ghost)."""
        return self.ghosts.user_id(actor) != self.ghosts.speaker(actor)

    async def _member_action(self, action: str, room: str, member: Actor, reason: str | None) -> None:
        user = self.ghosts.user_id(member)
        # Kicking someone who is not in the room is nothing to do; banning works on anyone.
        await self._tolerate(self.client.membership_action(action, room, user, reason),
                             "M_FORBIDDEN" if action != "ban" else "")
        self.ghosts.left(user, room)

    async def _set_level(self, room: str, user: str, level: int) -> None:
        levels = await self.client.state(room, "m.room.power_levels") or {}
        users = dict(levels.get("users") or {})
        if users.get(user, 0) == level:
            return
        if level:
            users[user] = level
        else:
            users.pop(user, None)
        await self.client.put_state(room, "m.room.power_levels", "", {**levels, "users": users})

    async def _tolerate(self, call: Any, errcode: str) -> None:
        try:
            await call
        except MatrixError as exc:
            if not errcode or exc.errcode != errcode:
                raise
            log.info("ignored: %s", exc)

    # -- moderation ------------------------------------------------------------------------------
    async def _moderation_action(self, d: Delivery, a: ModerationAction) -> dict[str, str]:
        if a.action == "remove_message" and a.message is not None:
            await self._redact(d, a.message, encode.redaction_reason(a), as_author=False)
        elif a.action in ("ban", "unban", "kick") and a.member is not None:
            reason = a.reason or (a.category.replace("_", " ") if a.category else None)
            await self._member_action(a.action, d.group, a.member, reason)
        else:
            self._degrade(f"moderation_{a.action}_not_carried")
        return {}

    async def _report_filed(self, d: Delivery, r: Report) -> dict[str, str]:
        """To the homeserver's admins, from the bot (the reporter stays unnamed)."""
        reason = r.category.replace("_", " ") + (f": {r.text}" if r.text else "")
        if is_event_id(r.message):
            await self.client.report(d.group, r.message, reason)
        elif r.member is not None and is_matrix_user(self.ghosts.user_id(r.member)):
            await self._tolerate(self.client.report(d.group, None, reason, member=self.ghosts.user_id(r.member)),
                                 "M_UNRECOGNIZED")
        else:
            self._degrade("report_not_carried")
        return {}

    async def _profile_updated(self, d: Delivery, p: ProfileUpdate) -> dict[str, str]:
        if not self._own(p.actor):
            user = self.ghosts.speaker(p.actor)
            if self.ghosts.registered(user):  # a ghost that never acted needs no name yet
                await self.ghosts.name(user, p.actor)
        return {}

    async def _account_moved(self, d: Delivery, p: AccountMove) -> dict[str, str]:
        return {}  # the core already shows the person by their new account


def _label(att: Attachment) -> str:
    return att.name or att.alt or "attachment"


def _with_text(msg: Message, text: str) -> Message:
    import msgspec

    return msgspec.structs.replace(msg, text=text, html=None)


def _bounded_add(s: set[Any], item: Any) -> None:
    if len(s) > CACHE_MAX:
        s.clear()
    s.add(item)


__all__: Sequence[str] = ["Ghosts", "Outbound", "is_event_id", "is_matrix_user"]
