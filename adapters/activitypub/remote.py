"""Fetching ActivityPub documents (actors, keys, objects) from other servers,
with the checks that real attacks taught (docs/activitypub.md, security):

* through ``GuardedSession`` (no private addresses unless allowed; size limit);
* every GET signed with the instance actor's key, so servers in
  authorized-fetch mode answer;
* the answer must have an ActivityPub content type
  (``application/activity+json``, or ``application/ld+json`` with the
  ActivityStreams profile): an uploaded file on the same host cannot pose as
  an actor (CVE-2024-25623);
* the document's ``id`` must equal the URL fetched, after redirects, or the
  fetch is refused (CVE-2024-23832);
* JSON nested deeper than ``max_depth`` is refused.

Actors and keys are cached for ``CACHE_TTL`` seconds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urldefrag

import orjson

from adapters.activitypub import signatures as sig
from adapters.activitypub.decode import as_list, id_of
from gateway.kit import FetchError, GuardedSession, Signer

ACCEPT = 'application/activity+json, application/ld+json; profile="https://www.w3.org/ns/activitystreams"'
CACHE_TTL = 3600.0
CACHE_MAX = 10_000


class RemoteError(Exception):
    """A document could not be had, or failed a check; ``transient`` if trying later may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def is_activitypub_type(content_type: str, raw_header: str = "") -> bool:
    ct = content_type.lower()
    if ct == "application/activity+json":
        return True
    return ct == "application/ld+json" and "https://www.w3.org/ns/activitystreams" in raw_header


def too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return False


def parse_json(body: bytes, max_depth: int) -> Any:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RemoteError(f"not JSON: {exc}") from None
    if too_deep(value, max_depth):
        raise RemoteError(f"JSON nested deeper than {max_depth}")
    return value


class Remote:
    def __init__(self, session: GuardedSession, signer: Signer, *, max_body: int, max_depth: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.session = session
        self.signer = signer
        self.max_body = max_body
        self.max_depth = max_depth
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self.fetches = 0

    async def get(self, url: str, *, cached: bool = False) -> dict[str, Any]:
        """The document at ``url`` (see the module docstring for the checks)."""
        url = urldefrag(url)[0]
        if cached:
            hit = self._cache.get(url)
            if hit is not None and hit[0] > self.clock():
                self._cache.move_to_end(url)
                return hit[1]  # type: ignore[no-any-return]
        self.fetches += 1
        try:
            got = await self.session.request("GET", url, max_bytes=self.max_body, headers={"Accept": ACCEPT},
                                             sign=self.signer)
        except FetchError as exc:
            raise RemoteError(f"fetching {url}: {exc}", transient=exc.transient) from None
        if got.status in (404, 410):
            raise RemoteError(f"{url} is gone (HTTP {got.status})")
        if got.status != 200:
            raise RemoteError(f"fetching {url}: HTTP {got.status}", transient=got.status >= 500 or got.status == 429)
        if not is_activitypub_type(got.content_type, got.headers.get("content-type", "")):
            raise RemoteError(f"{url} answered {got.content_type or 'no content type'}, not an ActivityPub document")
        doc = parse_json(got.body, self.max_depth)
        if not isinstance(doc, dict):
            raise RemoteError(f"{url}: not a JSON object")
        if doc.get("id") != urldefrag(got.url)[0]:
            raise RemoteError(f"{url}: the document says it is {doc.get('id')!r}, not what was fetched ({got.url})")
        self._remember(url, doc)
        return doc

    def _remember(self, url: str, doc: dict[str, Any]) -> None:
        self._cache[url] = (self.clock() + CACHE_TTL, doc)
        self._cache.move_to_end(url)
        while len(self._cache) > CACHE_MAX:
            self._cache.popitem(last=False)

    def forget(self, url: str) -> None:
        self._cache.pop(urldefrag(url)[0], None)

    async def key(self, key_id: str) -> tuple[str, sig.PublicKey]:
        """(owner actor id, public key) for ``key_id``. The key must be listed by
        its owner's actor document (``publicKey`` or ``assertionMethod``)."""
        doc = await self.get(key_id, cached=True)
        found = _key_in(doc, key_id)
        if found is None and isinstance(doc.get("owner") or doc.get("controller"), str):
            owner_id = doc.get("owner") or doc.get("controller")
            owner = await self.get(owner_id, cached=True)
            found = _key_in(owner, key_id)
        if found is None:
            raise RemoteError(f"no key {key_id} in its owner's actor document")
        return found

    async def actor(self, url: str) -> dict[str, Any]:
        doc = await self.get(url, cached=True)
        if not isinstance(doc.get("inbox"), str):
            raise RemoteError(f"{url} is not an actor (it has no inbox)")
        return doc


def _key_in(actor: Mapping[str, Any], key_id: str) -> tuple[str, sig.PublicKey] | None:
    owner = actor.get("id")
    if not isinstance(owner, str) or not isinstance(actor.get("inbox"), str):
        return None
    for k in as_list(actor.get("publicKey")):
        if isinstance(k, Mapping) and k.get("id") == key_id and isinstance(k.get("publicKeyPem"), str):
            if k.get("owner", owner) != owner:
                return None
            try:
                return owner, sig.cached_public_key(k["publicKeyPem"])
            except sig.SignatureError:
                return None
    for k in as_list(actor.get("assertionMethod")):
        if isinstance(k, Mapping) and k.get("id") == key_id and isinstance(k.get("publicKeyMultibase"), str):
            if id_of(k.get("controller")) not in (None, owner):
                return None
            try:
                return owner, sig.public_key_from_multibase(k["publicKeyMultibase"])
            except sig.SignatureError:
                return None
    return None


def inbox_of(actor: Mapping[str, Any], *, shared: bool = True) -> str | None:
    """Where to deliver to ``actor``: its server's shared inbox when it has one."""
    endpoints = actor.get("endpoints")
    if shared and isinstance(endpoints, Mapping) and isinstance(endpoints.get("sharedInbox"), str):
        return str(endpoints["sharedInbox"])
    inbox = actor.get("inbox")
    return inbox if isinstance(inbox, str) else None
