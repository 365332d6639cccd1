"""Recognising echoes: events the gateway sent to a group, coming back from it.

A site's hooks fire for what the gateway posted, so some sites send every
event straight back. Most echoes give themselves away by their author, a
gateway stand-in there (the chain's ``identify`` stage); the event types in
``FINGERPRINTED`` may carry no stand-in, so the fan-out remembers a
fingerprint of each one it sends (``remember``) and the chain's ``echo``
stage asks ``is_echo``. Fingerprints are kept here for speed and in the store
(``Tx.remember_sent``) so that another node of a cluster, or this one after a
restart, knows them too.
"""

from __future__ import annotations

import hashlib

from gateway.adapter import Inbound
from gateway.store.base import Tx, encode_payload

ECHO_WINDOW = 600.0
"""Seconds during which an event sent to a group is recognised if it comes back."""
FINGERPRINTED = frozenset({"civic.message.deleted", "civic.membership.changed", "civic.moderation.action",
                           "civic.report.filed"})
"""Event types whose echo may carry no stand-in author (the others are caught by
their author, who is a gateway stand-in on the site that echoes them)."""
ECHO_MEMORY = 50_000
"""Most fingerprints of sent events kept (about 3 MB). Sites send echoes within
moments; at 10,000 events a second this still covers two and a half seconds."""


def fingerprint(platform: str, group: str, etype: str, body: bytes) -> bytes:
    """The same on every node and in every process (unlike ``hash``)."""
    return hashlib.blake2b(b"\0".join((platform.encode(), group.encode(), etype.encode(), body)),
                           digest_size=16).digest()


class Echoes:
    """The fingerprints of what was just sent, in two generations: this
    half-window's and the one before."""

    def __init__(self, now: float) -> None:
        self._sent_now: set[bytes] = set()
        self._sent_before: set[bytes] = set()
        self._sent_since = now

    def remember(self, tx: Tx, platform: str, group: str, etype: str, body: bytes, now: float) -> None:
        """Called by the fan-out for each event of a ``FINGERPRINTED`` type it enqueues."""
        key = fingerprint(platform, group, etype, body)
        if len(self._sent_now) >= ECHO_MEMORY // 2 or now - self._sent_since > ECHO_WINDOW / 2:
            self._sent_before, self._sent_now, self._sent_since = self._sent_now, set(), now
        self._sent_now.add(key)
        tx.remember_sent(key, now)  # for the other nodes, and after a restart

    def is_echo(self, tx: Tx, ev: Inbound, now: float) -> bool:
        if ev.type not in FINGERPRINTED:
            return False
        key = fingerprint(ev.platform, ev.group, ev.type, encode_payload(ev.payload))
        if key in self._sent_now or key in self._sent_before:
            return True
        return tx.sent_since(key, now - ECHO_WINDOW)  # sent by another node, or before a restart

    def forget(self) -> None:
        """Drop the in-memory fingerprints (the store still has them)."""
        self._sent_now.clear()
        self._sent_before.clear()
