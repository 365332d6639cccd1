"""The pipeline: what happens to one inbound event, as one template.

``prepare`` (pure, on the event loop): clean every text field and bound the
event's time. ``apply_all`` (inside one store transaction, so all of it
commits or none): for each event, run the policy chain (``gateway.policy.chain``:
dedupe, unlinked, echo, imported ban rules, the id map's inbound step, consent,
link bans), then the event type's handler (``gateway.pipeline.handlers``),
which fans the event out to every target group's outbox in that target's
terms (``gateway.pipeline.fanout``, ids through ``gateway.idmap``). What the
events change in the policy state comes back as effects; ``commit`` swaps in
the next ``PolicyState`` once the transaction committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from msgspec.structs import replace

from gateway.adapter import Capabilities, Inbound
from gateway.idmap import IdMap
from gateway.ids import GroupRef, PlatformName
from gateway.pipeline.echo import ECHO_WINDOW, FINGERPRINTED, Echoes
from gateway.pipeline.fanout import Outcome
from gateway.pipeline.handlers import Handlers
from gateway.policy.chain import CHAIN, EventContext, Stage, run
from gateway.policy.state import Effect, Policy, PolicyState
from gateway.router import Router
from gateway.sanitize import clean_payload
from gateway.store.base import Tx
from schemas.cloudevents import EARLIEST_TIME, LATEST_TIME


class Pipeline:
    """Built once per gateway from the router, each platform's capabilities,
    the ghost key (``gateway.idmap.people``) and the gateway's ``Policy``.

    ``apply_all`` runs inside a store transaction (on the event loop or on the
    store's worker thread, as the store decides). The id map keeps caches of
    id-map rows; ``invalidate`` forgets them when a transaction failed."""

    def __init__(self, router: Router, capabilities: Mapping[PlatformName, Capabilities], ghost_key: bytes,
                 policy: Policy | None = None, clock: Callable[[], float] = time.time,
                 chain: Sequence[Stage] = CHAIN) -> None:
        self.router = router
        self.capabilities = dict(capabilities)
        self.policy = policy if policy is not None else Policy()
        self.clock = clock
        self.chain = tuple(chain)
        self.idmap = IdMap(ghost_key)
        self.echoes = Echoes(clock())
        self.handlers = Handlers(router, self.capabilities, self.idmap, self.echoes)

    @property
    def state(self) -> PolicyState:
        """The policy state now (as last committed)."""
        return self.policy.state

    def invalidate(self) -> None:
        """Forget the caches (after a transaction failed to commit)."""
        self.idmap.clear()

    # -- before the store ------------------------------------------------------------
    def prepare(self, ev: Inbound) -> Inbound:
        """Clean every text field (``gateway.sanitize.clean_payload``: rich
        text sanitised, control characters dropped, one-line fields kept on one
        line), whatever platform the event came from, and bound its time: a
        time outside ``EARLIEST_TIME`` .. ``LATEST_TIME`` (which no target could
        write) becomes the time it was received."""
        p = clean_payload(ev.payload)
        t = ev.time if EARLIEST_TIME <= ev.time <= LATEST_TIME else self.clock()  # NaN fails both
        if p is ev.payload and t == ev.time:
            return ev
        return replace(ev, payload=p, time=t)

    # -- inside the transaction --------------------------------------------------------
    def apply_all(self, tx: Tx, events: Sequence[Inbound]) -> list[Outcome]:
        """Apply ``events`` in order, each seeing what the ones before it changed
        (a ban, a withdrawal); the committed state is not touched (``commit``)."""
        state = self.policy.state
        outcomes = []
        for ev in events:
            out = self.apply(tx, ev, state)
            if out.effects:
                state = state.after(out.effects)
            outcomes.append(out)
        return outcomes

    def apply(self, tx: Tx, ev: Inbound, state: PolicyState | None = None) -> Outcome:
        """One event against ``state`` (default: the committed one)."""
        if state is None:
            state = self.policy.state
        now = self.clock()
        source = GroupRef(ev.platform, ev.group)
        ctx = EventContext(tx, ev, source, self.router.routes(source), now, self.idmap, self.echoes)
        decision = run(self.chain, ctx, state)
        if decision.status != "continue":
            return Outcome(decision.status, decision.reason)
        return self.handlers.handle(ctx, state, decision.skip)

    # -- after the transaction -----------------------------------------------------------
    def commit(self, outcomes: Sequence[Outcome]) -> None:
        """The transaction of ``outcomes`` committed: swap in the policy state
        their effects make. (Not called when it failed: the state stays.)"""
        effects: list[Effect] = [e for out in outcomes for e in out.effects]
        self.policy.committed(effects)


__all__ = ["Pipeline", "Outcome", "ECHO_WINDOW", "FINGERPRINTED"]
