"""Policy: whether an event crosses a link, as a chain of small stages.

* ``chain``: the stages (dedupe, unlinked, echo, ban rules, identify, consent,
  link bans), each ``stage(ctx, state) -> Decision``, and ``run``;
* ``state``: the one immutable ``PolicyState`` they read, swapped whole only
  after the transaction that changed it committed (``Policy``);
* ``banrules``: the ban rules adapters import, compiled once.
"""

from gateway.policy.banrules import BanRules, glob_pattern, server_of
from gateway.policy.state import Ban, Consent, Effect, Policy, PolicyState

__all__ = ["BanRules", "glob_pattern", "server_of", "Policy", "PolicyState", "Ban", "Consent", "Effect"]
