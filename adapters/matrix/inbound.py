"""Matrix -> gateway over the Application Service API: the routes the homeserver
calls on the gateway (the call that asks it to ping us is in ``homeserver``).

``AppserviceInbound`` serves, under the path of ``appservice_url`` (the
homeserver appends ``/_matrix/app/v1/...`` to that URL):

* ``PUT  /_matrix/app/v1/transactions/{txnId}``: the events the homeserver
  pushes. Each is screened (``check_envelope``) before anything else reads it,
  then decoded with ``decode_event``; a malformed one (a non-object
  ``content``, an id with a NUL, an ``origin_server_ts`` of 2**64 ...) is
  logged and counted by reason (``refused``), never fatal for the others nor
  for the transaction; ignored ones (echoes, state the gateway does not carry)
  are skipped. The rest go to ``ingest`` in one call, and the
  answer is ``200 {}`` only once ``ingest`` returned, i.e. once they are stored
  durably. ``Overloaded`` is answered with its status (429/503) and
  ``Retry-After``: the homeserver keeps the transaction and sends the same one
  again later (Synapse backs off 2, 4, 8 ... 512 s; a ping from us makes it
  retry at once). A transaction id already completed is answered ``200 {}``
  without ingesting again (a bounded in-memory map); after a restart the map
  is empty, but every ``Inbound`` carries the Matrix ``event_id`` as its event
  id, so the core's dedupe drops a replay all the same.
* ``GET /_matrix/app/v1/users/{userId}`` and ``GET /_matrix/app/v1/rooms/{roomAlias}``:
  the homeserver asks whether a user / alias in our namespace should exist.
  Always ``404``: a ``200`` promises that the appservice *has created* the
  entity (spec: it "MUST create the user using the client-server API"), and the
  gateway registers its ghosts itself, lazily, when it first posts as them; it
  provisions no aliases yet.
* ``POST /_matrix/app/v1/ping``: ``200 {}``; the homeserver calls it when we call
  ``POST /_matrix/client/v1/appservice/{id}/ping`` (``ping_homeserver``).

Every route checks ``Authorization: Bearer <hs_token>`` (spec since v1.4,
MSC2832) in constant time: no credentials -> ``401 M_UNAUTHORIZED``, wrong
ones -> ``403 M_FORBIDDEN``, and nothing is read or stored. Only then is a
body read, through the gateway's shared reader (the kit's ``BodyReader``, the
``read_body`` argument): ``413 M_TOO_LARGE`` over ``MAX_BODY``, ``408``
when it does not arrive within ``[gateway] body_timeout``, ``503`` with
``Retry-After`` when too many bodies are being received at once. The deprecated
``access_token`` query parameter is not accepted (Synapse sends the header
always; the query parameter only in addition, with
``use_appservice_legacy_authorization``).

The unprefixed legacy paths (``/transactions/{txnId}``, ``/users/...``,
``/rooms/...``) are not served: the spec's "legacy routes" paragraph is a
fallback for *homeservers* talking to old appservices, nothing an appservice
must offer, and Synapse only ever calls ``/_matrix/app/v1/...``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from adapters.matrix.config import MatrixConfig
from adapters.matrix.decode import Decoded, MatrixDecodeError, check_envelope, decode_event
from gateway.kit import BodyError, BodyReader, Inbound, Ingest, IngestResult, Overloaded, PlatformName

log = logging.getLogger("civic.matrix")

APP_PREFIX = "/_matrix/app/v1"
COMPLETED_TXNS = 4096
"""How many completed transaction ids are remembered (the homeserver only
resends its oldest unsent one, so a few would do)."""
GAP_WATCH = 30.0
"""Seconds after the gateway's start, or after it refused a transaction, in
which a transaction that skips a number is refused once (see ``_skips_one``)."""
MAX_BODY = 32 * 1024 * 1024
"""Largest transaction body read (Synapse sends at most 100 events, 100
ephemeral events and 100 to-device messages per transaction)."""


def _error(status: int, errcode: str, message: str, headers: Mapping[str, str] | None = None,
           **extra: Any) -> web.Response:
    return web.Response(body=orjson.dumps({"errcode": errcode, "error": message, **extra}), status=status,
                        content_type="application/json", headers=headers)


def _ok() -> web.Response:
    return web.Response(body=b"{}", status=200, content_type="application/json")


Context = Callable[[Sequence[Any]], Awaitable[Mapping[str, Mapping[str, Any]]]]
"""Extra ``decode_event`` arguments by event id, e.g. the event a redaction
removes (I/O the pure codec cannot do). Gets only screened events."""
Prepare = Callable[[Sequence[Any], list[Inbound]], Awaitable[list[Inbound]]]
"""Called after decoding and before storing, with the screened events and
what they decoded to: remember, rewrite or react; returns what to store."""


async def _no_context(events: Sequence[Any]) -> Mapping[str, Mapping[str, Any]]:
    return {}


async def _as_decoded(events: Sequence[Any], inbound: list[Inbound]) -> list[Inbound]:
    return inbound


class AppserviceInbound:
    """The homeserver -> gateway half of one ``kind = "matrix"`` platform.

    ``ingest`` is ``AdapterContext.ingest``; ``prefix`` the path the routes
    live under (by default the path of ``config.appservice_url``, e.g.
    ``/v1/platforms/hub``: set it when a reverse proxy rewrites paths).
    What the adapter adds around decoding is passed in, never looked up on
    an owner: ``context`` and ``prepare`` (see ``Context``, ``Prepare``; by
    default they add nothing), and ``on_gap``, called when a transaction was
    refused because an older one is missing (e.g. to ping the homeserver
    soon, which makes it retry at once)."""

    def __init__(self, ingest: Ingest, config: MatrixConfig, platform: str, *, prefix: str | None = None,
                 completed_max: int = COMPLETED_TXNS, context: Context = _no_context,
                 prepare: Prepare = _as_decoded, on_gap: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic, read_body: BodyReader | None = None) -> None:
        self.ingest = ingest
        self.read_body = read_body or BodyReader()
        self.context = context
        self.prepare = prepare
        self.on_gap = on_gap
        self.clock = clock
        self.config = config
        self.platform = PlatformName(platform)
        self.prefix = (urlsplit(config.appservice_url).path if prefix is None else prefix).rstrip("/")
        self.bot_user = f"@{config.bot_localpart}:{config.server_name}"
        self._hs_token = config.hs_token.encode()
        self._completed: OrderedDict[str, None] = OrderedDict()
        self._completed_max = completed_max
        self._last_number: int | None = None
        self._gap_refused: str | None = None
        self._watch_until = clock() + GAP_WATCH  # the homeserver may be recovering from our absence
        # counters (for logs, metrics and tests)
        self.transactions = 0
        """Transactions stored and answered 200 (replays not counted)."""
        self.replays = 0
        self.decode_errors = 0
        """Events refused as malformed (all reasons)."""
        self.refused: dict[str, int] = {}
        """Events refused, by reason (``MatrixDecodeError.reason``; ``error`` for a decoder bug)."""
        self.ignored: dict[str, int] = {}
        self.overloaded = 0
        self.gaps = 0
        """Transactions refused once because an older one had not come (see ``_skips_one``)."""
        self.pings: list[str | None] = []
        """``transaction_id`` of each ping the homeserver sent (the last 100)."""

    # -- routes ---------------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        base = self.prefix + APP_PREFIX
        return [
            web.put(base + "/transactions/{txnId}", self.handle_transaction),
            web.get(base + "/users/{userId}", self.handle_query_user),
            web.get(base + "/rooms/{roomAlias}", self.handle_query_room),
            web.post(base + "/ping", self.handle_ping),
        ]

    def _refuse(self, request: web.Request) -> web.Response | None:
        """``None`` when the request carries our ``hs_token``, else the error answer."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _error(401, "M_UNAUTHORIZED", "missing hs_token (Authorization: Bearer ...)")
        # A header that is not UTF-8 arrives with surrogate escapes: compare its bytes as they came.
        if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self._hs_token):
            log.warning("%s: a request to %s with a wrong hs_token", self.platform, request.path)
            return _error(403, "M_FORBIDDEN", "wrong hs_token")
        return None

    async def handle_transaction(self, request: web.Request) -> web.Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        txn_id = request.match_info["txnId"]
        if txn_id in self._completed:
            self._completed.move_to_end(txn_id)
            self.replays += 1
            return _ok()
        if self._skips_one(txn_id):
            self.gaps += 1
            log.warning("%s: transaction %s came before %s; asking the homeserver to send the older one first",
                        self.platform, txn_id, self._last_number + 1 if self._last_number is not None else "?")
            self.on_gap()
            return _error(503, "M_UNKNOWN", "an older transaction is missing: send it first",
                          headers={"Retry-After": "1"})
        try:
            body = await self._read_json(request)
        except _BadRequest as exc:
            return _error(exc.status, exc.errcode, str(exc), headers=exc.headers)
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list):
            return _error(400, "M_BAD_JSON", "`events`: expected a list")
        events = self.screen(events)  # what ``context``, ``prepare`` and the decoder may read safely
        contexts = await self.context(events)
        inbound = self.decode_events(events, now=time.time(), contexts=contexts)
        inbound = await self.prepare(events, inbound)
        if inbound:
            try:
                await self._store(inbound)
            except Overloaded as exc:
                self.overloaded += 1
                self._watch_until = self.clock() + GAP_WATCH  # the homeserver will recover from this refusal
                log.info("%s: gateway overloaded (%s); the homeserver will send transaction %s again",
                         self.platform, exc, txn_id)
                extra = {"retry_after_ms": exc.retry_after * 1000} if exc.status == 429 else {}
                return _error(exc.status, "M_LIMIT_EXCEEDED" if exc.status == 429 else "M_UNKNOWN", str(exc),
                              headers={"Retry-After": str(exc.retry_after)}, **extra)
        self._complete(txn_id)
        self.transactions += 1
        return _ok()

    async def handle_query_user(self, request: web.Request) -> web.Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        return _error(404, "M_NOT_FOUND", "the gateway creates its users itself, when it needs them")

    async def handle_query_room(self, request: web.Request) -> web.Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        return _error(404, "M_NOT_FOUND", "the gateway provisions no rooms by alias")

    async def handle_ping(self, request: web.Request) -> web.Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        try:
            body = await self._read_json(request)
        except _BadRequest:
            body = None  # the ping's body is informational only
        txn = body.get("transaction_id") if isinstance(body, dict) else None
        self.pings.append(txn if isinstance(txn, str) else None)
        del self.pings[:-100]
        return _ok()

    # -- the work -------------------------------------------------------------------------------
    def screen(self, events: Sequence[Any]) -> list[Any]:
        """The events of a transaction that have the shape every event must
        have (``check_envelope``); the others are logged and counted."""
        out = []
        for event in events:
            try:
                check_envelope(event)
            except MatrixDecodeError as exc:
                self._refuse_event(event, exc.reason, exc)
                continue
            out.append(event)
        return out

    def _refuse_event(self, event: Any, reason: str, why: object) -> None:
        self.decode_errors += 1
        self.refused[reason] = self.refused.get(reason, 0) + 1
        event_id = event.get("event_id") if isinstance(event, Mapping) else None
        log.warning("%s: skipped Matrix event %s: %s", self.platform,
                    event_id if isinstance(event_id, str) else "(no event id)", why)

    def decode_events(self, events: Sequence[Any], *, now: float,
                      contexts: Mapping[str, Mapping[str, Any]] | None = None) -> list[Inbound]:
        """The ``Inbound`` records of one transaction's events; bad ones logged
        and counted, ignored ones counted by reason. ``contexts``: extra
        ``decode_event`` arguments by event id (``redacted``, ``prev_power_levels``)."""
        out: list[Inbound] = []
        config = self.config
        for event in events:
            event_id = event.get("event_id") if isinstance(event, Mapping) else None
            extra = contexts.get(event_id, {}) if contexts and isinstance(event_id, str) else {}
            try:
                result = decode_event(event, bot_user=self.bot_user, ghost_prefix=config.ghost_prefix,
                                      server_name=config.server_name, **extra)
            except MatrixDecodeError as exc:
                self._refuse_event(event, exc.reason, exc)
                continue
            except Exception as exc:  # a decoder bug: this event is lost, not the transaction
                log.exception("%s: decoding a Matrix event failed", self.platform)
                self._refuse_event(event, "error", f"{type(exc).__name__}: {exc}")
                continue
            if isinstance(result, Decoded):
                out.extend(result.to_inbound(self.platform, now=now))
            else:
                self.ignored[result.reason] = self.ignored.get(result.reason, 0) + 1
        return out

    async def _store(self, inbound: list[Inbound]) -> IngestResult:
        # Shielded: a homeserver that hangs up mid-ingest must not cancel a
        # store between its commit and its hand-over to delivery.
        attempt = asyncio.ensure_future(self.ingest(inbound))
        attempt.add_done_callback(_observe)
        return await asyncio.shield(attempt)

    def _skips_one(self, txn_id: str) -> bool:
        """Whether ``txn_id`` skips a transaction, while the homeserver may be
        recovering from the gateway's absence (refused once per gap).

        When the gateway was unreachable (or refused a transaction), Synapse
        1.163 can strand one: a transaction made while the appservice counts as
        down, just after its recoverer looked for unsent ones and declared it
        up again, is not sent until the *next* failure
        (``_TransactionController.send`` against ``_Recoverer.retry``,
        synapse/appservice/scheduler.py); its events arrive late and out of
        order. Synapse numbers transactions from one sequence shared by all
        its appservices, so a gap alone proves nothing (another bridge took the
        numbers between); only within ``GAP_WATCH`` seconds of the gateway's
        start or of its own refusal is a gap refused, once: that puts Synapse
        back into recovery, which sends our oldest unsent transaction first (a
        ping makes it do so at once), and the refused one comes again and is
        taken. Ids that are not numbers (other homeservers) are taken as they come."""
        if not txn_id.isdigit() or self._last_number is None or txn_id == self._gap_refused:
            return False
        if int(txn_id) > self._last_number + 1 and self.clock() < self._watch_until:
            self._gap_refused = txn_id
            self._watch_until = self.clock() + GAP_WATCH  # our refusal starts a recovery too
            return True
        return False

    def _complete(self, txn_id: str) -> None:
        if txn_id.isdigit():
            self._last_number = max(int(txn_id), self._last_number or 0)
        self._completed[txn_id] = None
        while len(self._completed) > self._completed_max:
            self._completed.popitem(last=False)

    async def _read_json(self, request: web.Request) -> Any:
        """The request's JSON body, read through the gateway's shared reader
        (after ``_refuse`` checked the token): bounded in size, time and memory."""
        try:
            body = await self.read_body(request, MAX_BODY)
        except BodyError as exc:
            raise _BadRequest(exc.status, "M_TOO_LARGE" if exc.status == 413 else "M_UNKNOWN", str(exc),
                              headers=exc.headers) from None
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _BadRequest(400, "M_NOT_JSON", "the body is not JSON") from None


class _BadRequest(Exception):
    def __init__(self, status: int, errcode: str, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode
        self.headers = headers


def _observe(task: asyncio.Future[IngestResult]) -> None:
    """Retrieve the outcome of an ingest nobody awaits any more."""
    if not task.cancelled():
        task.exception()
