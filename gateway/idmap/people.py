"""People across platforms: who a native id is, and how a person is shown
(the id map's part for people; ``gateway.idmap.IdMap`` is its only user).

A person gets one canonical id, whatever platform names them. On each target
they appear as their own account there if they have one (an account move makes
it so), else as a stand-in that shows no more than the identity level they
chose: a pseudonymous or identified person by a stable ``cga_`` id and their
name, an anonymous person by an ``anon_`` id that differs per group (an HMAC of
person and group under a key only the gateway holds) and no name at all.

The two caches hold id-map rows, which change only when an account move
rewrites one; ``clear`` forgets them then, and after a failed commit.
"""

from __future__ import annotations

import hashlib
import hmac

from gateway import ids
from gateway.idmap.refs import Person, PersonRef
from gateway.ids import ACTOR, CanonicalId, GroupRef
from gateway.store.base import Tx
from schemas.v1 import Actor

CACHE_MAX = 100_000


class People:
    def __init__(self, ghost_key: bytes) -> None:
        self._ghost_key = ghost_key
        self._in: dict[tuple[str, str], tuple[CanonicalId, int]] = {}
        self._out: dict[tuple[str, str], tuple[str, int]] = {}

    def clear(self) -> None:
        self._in.clear()
        self._out.clear()

    def resolve(self, tx: Tx, source: GroupRef, actor: Actor) -> Person:
        """Canonical id of a person as the source platform names them (new ones
        get one), how the platform came by that id, and the person as they may
        be shown: someone known to the source only by an anonymous stand-in
        stays anonymous, whatever the event claims."""
        key = (source.platform, actor.id)
        hit = self._in.get(key)
        if hit is not None:
            return Person(PersonRef(hit[0]), hit[1], actor)
        hit = tx.lookup(source.platform, "", ACTOR, actor.id)
        if hit is None and actor.id.startswith("anon_"):
            hit = tx.lookup(source.platform, source.group, ACTOR, actor.id)
            if hit is not None:  # per-group stand-ins are not cached by platform
                return Person(PersonRef(hit[0]), hit[1], Actor(id=actor.id, identity="anonymous"))
        if hit is None:
            hit = (ids.new_actor_id(), ids.ORIGIN)
            tx.map(source.platform, "", ACTOR, actor.id, hit[0], ids.ORIGIN)
        if len(self._in) > CACHE_MAX:
            self._in.clear()
        self._in[key] = hit
        return Person(PersonRef(hit[0]), hit[1], actor)

    def show(self, tx: Tx, c: CanonicalId, actor: Actor, target: GroupRef) -> Actor:
        """How a person appears on the target: their own account there if they
        have one, else a stand-in that shows no more than their identity level
        (an anonymous person gets a different, unlinkable stand-in per group)."""
        key = (c, target.platform)
        own = self._out.get(key)
        if own is None:
            own = tx.native_for(c, target.platform, "", ACTOR) or ("", ids.SENT)
            if len(self._out) > CACHE_MAX:
                self._out.clear()
            self._out[key] = own
        if own[1] != ids.SENT:
            return Actor(id=own[0], name=actor.name, identity=actor.identity)
        if actor.identity == "anonymous":
            digest = hmac.new(self._ghost_key, f"{c}|{target.platform}|{target.group}".encode(), hashlib.sha256)
            ghost = "anon_" + digest.hexdigest()[:24]
            tx.map(target.platform, target.group, ACTOR, ghost, c, ids.SENT)
            return Actor(id=ghost, identity="anonymous")
        if not own[0]:
            tx.map(target.platform, "", ACTOR, c, c, ids.SENT)
            own = self._out[key] = (c, ids.SENT)
        return Actor(id=own[0], name=actor.name, identity=actor.identity)
