"""The policy state: one immutable value that every stage of the chain reads.

``PolicyState`` holds what decides whether an event crosses a link: the link
bans (mirrored moderation), the people who withdrew their consent, and the
ban rules the adapters imported (per platform, and compiled once). It is
frozen: nothing changes it in place. What an event changes is an ``Effect``
(``Ban``, ``Consent``) that the pipeline returns with the event's outcome;
``Policy.committed`` computes the next state from them and swaps it whole,
and only after the transaction that wrote them committed (a failed commit
leaves the state as it was). In a cluster another node may change bans or
consent: ``Policy.reload`` builds a fresh state from the store then. A single
node never needs to reload: its own swaps are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from msgspec import Struct
from msgspec.structs import replace

from gateway.adapter import BanRule
from gateway.ids import CanonicalId, LinkName, PlatformName
from gateway.policy.banrules import BanRules


class Ban(Struct, frozen=True, gc=False):
    """A person was banned from (or unbanned on) a link with mirrored moderation."""

    link: LinkName
    person: CanonicalId
    banned: bool


class Consent(Struct, frozen=True, gc=False):
    """A person withdrew (or granted again) their consent to be carried."""

    person: CanonicalId
    withdrawn: bool


Effect = Ban | Consent


class PolicyState(Struct, frozen=True, gc=False):
    bans: frozenset[tuple[LinkName, CanonicalId]] = frozenset()
    withdrawn: frozenset[CanonicalId] = frozenset()
    rules: tuple[tuple[PlatformName, tuple[BanRule, ...]], ...] = ()
    """The ban rules each platform contributes (``with_rules``)."""
    ban_rules: BanRules | None = None
    """All of ``rules`` compiled; None when there are none, so that the chain
    pays one comparison for them."""

    def after(self, effects: Iterable[Effect]) -> PolicyState:
        """This state with ``effects`` applied, in order (itself if they change nothing)."""
        bans, withdrawn = set(self.bans), set(self.withdrawn)
        for e in effects:
            if isinstance(e, Ban):
                (bans.add if e.banned else bans.discard)((e.link, e.person))
            else:
                (withdrawn.add if e.withdrawn else withdrawn.discard)(e.person)
        if bans == self.bans and withdrawn == self.withdrawn:
            return self
        return replace(self, bans=frozenset(bans), withdrawn=frozenset(withdrawn))

    def with_rules(self, platform: PlatformName, rules: Sequence[BanRule]) -> PolicyState:
        """This state with ``platform``'s ban rules replaced (the rules of every
        platform together apply to what enters from any). Raises ``ValueError``
        for a rule of an unknown kind, before anything changes."""
        by_platform = {**dict(self.rules), platform: tuple(rules)}
        compiled = BanRules(r for rs in by_platform.values() for r in rs)  # checks kinds
        return replace(self, rules=tuple((p, rs) for p, rs in by_platform.items() if rs),
                       ban_rules=compiled if compiled else None)

    def rules_of(self, platform: PlatformName) -> tuple[BanRule, ...]:
        return dict(self.rules).get(platform, ())


class _Source(Protocol):
    async def bans(self) -> set[tuple[LinkName, CanonicalId]]: ...

    async def withdrawn(self) -> set[CanonicalId]: ...


class Policy:
    """Holds a gateway's current ``PolicyState`` (one per gateway; the pipeline
    and the gateway's ``set_ban_rules`` share it, so the rules are held once)."""

    def __init__(self, state: PolicyState | None = None) -> None:
        self.state = state if state is not None else PolicyState()
        self._reloads: list[list[Effect]] = []  # effects committed while a reload reads the store

    def set_rules(self, platform: PlatformName, rules: Sequence[BanRule]) -> PolicyState:
        self.state = self.state.with_rules(platform, rules)
        return self.state

    def committed(self, effects: Sequence[Effect]) -> None:
        """The transaction that wrote ``effects`` committed: swap in the next state."""
        if effects:
            self.state = self.state.after(effects)
            for journal in self._reloads:
                journal.extend(effects)

    async def reload(self, store: _Source) -> None:
        """Take bans and consent from the store (at start, and when another node
        changed them). What this node committed while the store was read is
        applied again on top, so that a read that began before it loses nothing."""
        journal: list[Effect] = []
        self._reloads.append(journal)
        try:
            bans, withdrawn = await store.bans(), await store.withdrawn()
        finally:
            self._reloads = [j for j in self._reloads if j is not journal]
        self.state = replace(self.state, bans=frozenset(bans), withdrawn=frozenset(withdrawn)).after(journal)


__all__ = ["PolicyState", "Policy", "Ban", "Consent", "Effect"]
