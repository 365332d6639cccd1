"""The documents the gateway serves about its actors and itself, each a
``GET`` route: WebFinger, NodeInfo, the instance, group and person actors,
their (empty) collections, the notes it posted and the activities it sent.

Nothing here changes state or sends anything; the documents are built by
``encode`` (pure) from the adapter's state and config.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from adapters.activitypub import encode as enc
from adapters.activitypub.config import ActivityPubConfig
from gateway.kit import AdapterState
from schemas.v1 import Actor

AP_JSON = "application/activity+json"
VERSION = "0.1.0"
WEBFINGER_MAX = 1024
"""Longest WebFinger ``resource`` read (``acct:`` + a name of at most ``enc.NAME_MAX`` + ``@`` + a host)."""


class Documents:
    """The ``GET`` routes of one ActivityPub platform. ``hosted`` are the
    names of the groups it hosts; ``key_pem`` gives the public key of the
    gateway's actors (made at start, after this object)."""

    def __init__(self, config: ActivityPubConfig, urls: enc.Urls, state: AdapterState, hosted: Set[str],
                 key_pem: Callable[[], str]) -> None:
        self.config = config
        self.urls = urls
        self.state = state
        self.hosted = hosted
        self.key_pem = key_pem

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/.well-known/webfinger", self.webfinger),
            web.get("/.well-known/nodeinfo", self.nodeinfo_links),
            web.get("/nodeinfo/2.1", self.nodeinfo),
            web.get("/ap/actor", self.instance_actor),
            web.get("/ap/groups/{name}", self.group_actor),
            web.get("/ap/groups/{name}/followers", self.collection),
            web.get("/ap/groups/{name}/following", self.collection),
            web.get("/ap/groups/{name}/outbox", self.collection),
            web.get("/ap/people/{id}", self.person_actor),
            web.get("/ap/people/{id}/{what:followers|following|outbox}", self.collection),
            web.get("/ap/notes/{id}", self.note),
            web.get("/ap/activities/{id}", self.activity_doc),
        ]

    @staticmethod
    def _json(doc: Any, status: int = 200, content_type: str = AP_JSON) -> web.Response:
        return web.Response(body=orjson.dumps(doc), status=status, content_type=content_type)

    async def webfinger(self, request: web.Request) -> web.Response:
        resource = request.query.get("resource", "")
        if not resource:
            return web.json_response({"error": "`resource`: missing (acct:NAME@HOST)"}, status=400)
        if len(resource) > WEBFINGER_MAX:
            return web.json_response({"error": f"`resource`: longer than {WEBFINGER_MAX} characters"}, status=400)
        if "://" in resource and not resource.startswith("acct:"):
            return web.json_response({"error": "not a user of this server (ask by acct:NAME@HOST)"}, status=404)
        name, _, domain = resource.removeprefix("acct:").lstrip("@").rpartition("@")
        problem = enc.name_problem(name) or enc.name_problem(domain)
        if problem:
            return web.json_response({"error": f"`resource`: not acct:NAME@HOST ({problem})"}, status=400)
        if domain.lower() != self.urls.host.lower():
            return web.json_response({"error": "not a user of this server"}, status=404)
        if name in self.hosted:
            actor_id = self.urls.group(name)
        elif name == self.urls.host:
            actor_id = self.urls.instance
        elif await self.state.get_one(f"person:{name}") is not None:
            actor_id = self.urls.person(name)
        else:
            return web.json_response({"error": "no such account"}, status=404)
        return self._json(enc.webfinger(f"acct:{name}@{domain}", actor_id), content_type="application/jrd+json")

    async def nodeinfo_links(self, request: web.Request) -> web.Response:
        return web.json_response({"links": [{"rel": "http://nodeinfo.diaspora.software/ns/schema/2.1",
                                             "href": f"{self.urls.base}/nodeinfo/2.1"}]})

    async def nodeinfo(self, request: web.Request) -> web.Response:
        return web.json_response(enc.nodeinfo(VERSION))

    async def instance_actor(self, request: web.Request) -> web.Response:
        return self._json(enc.instance_actor(self.urls, self.key_pem()))

    @staticmethod
    def _bad_name(value: str, what: str) -> web.Response | None:
        """``400`` for a name or id in a path that none can be (``enc.name_problem``)."""
        problem = enc.name_problem(value)
        return web.json_response({"error": f"not a {what}: {problem}"}, status=400) if problem else None

    async def group_actor(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if bad := self._bad_name(name, "group name"):
            return bad
        if name not in self.hosted:
            return web.json_response({"error": "no such group"}, status=404)
        settings = self.config.groups.get(name)
        return self._json(enc.group_actor(self.urls, name, self.key_pem(), display=settings.name if settings else None,
                                          summary=settings.summary if settings else None))

    async def person_actor(self, request: web.Request) -> web.Response:
        stand_in = request.match_info["id"]
        if bad := self._bad_name(stand_in, "person id"):
            return bad
        raw = await self.state.get_one(f"person:{stand_in}")
        if raw is None:
            return web.json_response({"error": "no such person"}, status=404)
        p = orjson.loads(raw)
        return self._json(enc.person_actor(self.urls, Actor(stand_in, name=p.get("name"),
                                                            identity=p.get("identity", "pseudonymous")),
                                           self.key_pem()))

    async def collection(self, request: web.Request) -> web.Response:
        # Members are not listed and nothing is counted (no engagement figures).
        if "name" in request.match_info:
            name = request.match_info["name"]
            if bad := self._bad_name(name, "group name"):
                return bad
            if name not in self.hosted:
                return web.json_response({"error": "no such group"}, status=404)
        else:
            stand_in = request.match_info["id"]
            if bad := self._bad_name(stand_in, "person id"):
                return bad
            if await self.state.get_one(f"person:{stand_in}") is None:
                return web.json_response({"error": "no such person"}, status=404)
        return self._json(enc.collection(self.urls.base + request.path))

    async def note(self, request: web.Request) -> web.Response:
        note_id = unquote(request.match_info["id"], errors="surrogateescape")
        if bad := self._bad_name(note_id, "note id"):
            return bad
        raw = await self.state.get_one(f"note:{note_id}")
        if raw is None:
            return web.json_response({"error": "no such note"}, status=404)
        rec = orjson.loads(raw)
        if rec.get("deleted"):
            return self._json({"@context": enc.AS_CONTEXT, **enc.tombstone(rec["doc"]["id"])}, status=410)
        return self._json({"@context": enc.CONTEXT, **rec["doc"]})

    async def activity_doc(self, request: web.Request) -> web.Response:
        event_id = unquote(request.match_info["id"], errors="surrogateescape")
        if bad := self._bad_name(event_id, "activity id"):
            return bad
        raw = await self.state.get_one(f"act:{event_id}")
        if raw is None:
            return web.json_response({"error": "no such activity"}, status=404)
        return web.Response(body=raw, content_type=AP_JSON)
