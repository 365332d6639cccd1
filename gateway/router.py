"""Links: which groups behave as one. Pure and in memory; built from config."""

from __future__ import annotations

from typing import NamedTuple

from gateway.config import LinkConfig
from gateway.ids import GroupRef


class Route(NamedTuple):
    """Where an event goes: a target group, through a link."""

    link: LinkConfig
    target: GroupRef


class Router:
    """Answers: an event from this group goes to which groups, through which link?

    A message reaches every other group of every link its group is in, once,
    and never its own group."""

    def __init__(self, links: list[LinkConfig]) -> None:
        self.links = list(links)
        self._routes: dict[GroupRef, list[Route]] = {}
        self._links_of: dict[GroupRef, list[LinkConfig]] = {}
        for link in self.links:
            refs = link.refs()
            for source in refs:
                self._links_of.setdefault(source, []).append(link)
                routes = self._routes.setdefault(source, [])
                seen = {r.target for r in routes}
                for target in refs:
                    if target != source and target not in seen:
                        routes.append(Route(link, target))
                        seen.add(target)

    def routes(self, source: GroupRef) -> list[Route]:
        return self._routes.get(source, [])

    def links_of(self, group: GroupRef) -> list[LinkConfig]:
        return self._links_of.get(group, [])

    def groups(self) -> list[GroupRef]:
        return list(self._routes)
