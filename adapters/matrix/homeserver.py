"""Gateway -> homeserver: the client-server API calls the appservice makes,
with its ``as_token``, as its bot or (``?user_id=``) as one of its ghosts,
and ``ping_homeserver``, which asks the homeserver to call our ``/ping``.

Every failure becomes ``MatrixError`` with the homeserver's ``errcode``, and
``delivery_error`` turns one into what the delivery worker understands: rate
limits (429, ``M_LIMIT_EXCEEDED``), 5xx and network trouble are retried (with
the homeserver's ``retry_after_ms`` when it gives one); other 4xx are not.

Sends are idempotent: ``send`` and ``redact`` take a transaction id, and the
homeserver answers a repeated (user, transaction id) with the event it already
made (spec: client-server API, "Transaction identifiers"), so a retried
delivery never posts twice. The gateway uses its own delivery event id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from adapters.matrix.config import MatrixConfig
from gateway.kit import DeliveryError, PermanentDeliveryError, TransientDeliveryError

log = logging.getLogger("civic.matrix")

CS = "/_matrix/client/v3"
RETRIED_STATUSES = frozenset({408, 429})


class MatrixError(Exception):
    """A call the homeserver answered with an error (``status`` 0: it was unreachable)."""

    def __init__(self, status: int, errcode: str | None, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status >= 500 or self.status in RETRIED_STATUSES \
            or self.errcode == "M_LIMIT_EXCEEDED"


def delivery_error(exc: MatrixError, what: str) -> DeliveryError:
    if exc.transient:
        return TransientDeliveryError(f"{what}: {exc}", retry_after=exc.retry_after)
    return PermanentDeliveryError(f"{what}: {exc}")


def q(part: str) -> str:
    """One path segment, escaped (room and event ids hold ``!``, ``$``, ``:``)."""
    return quote(part, safe="")


class MatrixClient:
    """One aiohttp session towards the homeserver, authenticated as the appservice."""

    def __init__(self, config: MatrixConfig, *, timeout: float = 30.0) -> None:
        self.config = config
        self.bot = f"@{config.bot_localpart}:{config.server_name}"
        self.timeout = timeout
        self.session: aiohttp.ClientSession | None = None
        self.calls = 0
        self.failures = 0
        self.on_reach: Callable[[bool, str], None] = lambda reached, why: None
        """Hears after each call whether the homeserver answered (a gateway
        error of its reverse proxy, 502-504, counts as not answering)."""

    async def start(self) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.config.as_token}"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=64))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # -- the one place that talks HTTP ----------------------------------------------------------
    async def request(self, method: str, path: str, body: Any = None, *, user: str | None = None,
                      query: Mapping[str, str] | None = None, data: bytes | None = None,
                      content_type: str | None = None, base: str | None = None) -> Any:
        """JSON answer of one call; ``user``: act as that user of the namespace."""
        assert self.session is not None, "client not started"
        params = dict(query or {})
        if user is not None and user != self.bot:
            params["user_id"] = user
        headers = {}
        if data is None and body is not None:
            data = orjson.dumps(body)
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        url = (base or self.config.homeserver + CS) + path
        self.calls += 1
        try:
            async with self.session.request(method, url, params=params, data=data, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
                retry_header = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.failures += 1
            why = f"homeserver unreachable: {type(exc).__name__}: {exc}"
            self.on_reach(False, why)
            raise MatrixError(0, None, f"{method} {path}: {why}") from None
        if status in (502, 503, 504):
            self.on_reach(False, f"homeserver unavailable: HTTP {status} to {method} {path}")
        else:
            self.on_reach(True, "")
        try:
            answer = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            answer = {"error": raw[:200].decode(errors="replace")}
        if 200 <= status < 300:
            return answer
        self.failures += 1
        answer = answer if isinstance(answer, dict) else {}
        errcode = answer.get("errcode") if isinstance(answer.get("errcode"), str) else None
        retry_after = None
        if isinstance(answer.get("retry_after_ms"), int):
            retry_after = answer["retry_after_ms"] / 1000.0
        elif retry_header and retry_header.isdigit():
            retry_after = float(retry_header)
        raise MatrixError(status, errcode, f"{method} {path}: HTTP {status} {errcode or ''} {answer.get('error', '')}"
                          .rstrip(), retry_after=retry_after)

    # -- users ----------------------------------------------------------------------------------
    async def register(self, localpart: str) -> None:
        """Register a user of the namespace (``M_USER_IN_USE`` is fine: it exists)."""
        try:
            await self.request("POST", "/register", {"type": "m.login.application_service", "username": localpart,
                                                     "inhibit_login": True})
        except MatrixError as exc:
            if exc.errcode != "M_USER_IN_USE":
                raise

    async def set_display_name(self, user: str, name: str) -> None:
        await self.request("PUT", f"/profile/{q(user)}/displayname", {"displayname": name}, user=user)

    # -- rooms ----------------------------------------------------------------------------------
    async def join(self, room: str, user: str | None = None) -> None:
        await self.request("POST", f"/join/{q(room)}", {}, user=user)

    async def leave(self, room: str, user: str, reason: str | None = None) -> None:
        await self.request("POST", f"/rooms/{q(room)}/leave", _reason({}, reason), user=user)

    async def invite(self, room: str, target: str, *, by: str | None = None) -> None:
        await self.request("POST", f"/rooms/{q(room)}/invite", {"user_id": target}, user=by)

    async def membership_action(self, action: str, room: str, target: str, reason: str | None = None, *,
                                by: str | None = None) -> None:
        """``kick``, ``ban`` or ``unban`` ``target``, as ``by`` (default the bot)."""
        await self.request("POST", f"/rooms/{q(room)}/{action}", _reason({"user_id": target}, reason), user=by)

    async def send(self, room: str, event_type: str, content: Mapping[str, Any], txn_id: str, *,
                   user: str | None = None, ts: float | None = None) -> str:
        """The event id of ``content`` sent as ``user``; ``ts`` (Unix seconds) the
        time the room shows (timestamp massaging, appservices only)."""
        query = {"ts": str(int(ts * 1000))} if ts is not None else None
        done = await self.request("PUT", f"/rooms/{q(room)}/send/{q(event_type)}/{q(txn_id)}", content,
                                  user=user, query=query)
        return _event_id(done)

    async def redact(self, room: str, event_id: str, txn_id: str, reason: str | None = None, *,
                     user: str | None = None) -> str:
        done = await self.request("PUT", f"/rooms/{q(room)}/redact/{q(event_id)}/{q(txn_id)}",
                                  _reason({}, reason), user=user)
        return _event_id(done)

    async def put_state(self, room: str, event_type: str, state_key: str, content: Mapping[str, Any], *,
                        user: str | None = None) -> str:
        done = await self.request("PUT", f"/rooms/{q(room)}/state/{q(event_type)}/{q(state_key)}", content,
                                  user=user)
        return _event_id(done)

    async def state(self, room: str, event_type: str, state_key: str = "") -> dict[str, Any] | None:
        """The content of one state event (``None`` when the room has none)."""
        try:
            content = await self.request("GET", f"/rooms/{q(room)}/state/{q(event_type)}/{q(state_key)}")
        except MatrixError as exc:
            if exc.errcode == "M_NOT_FOUND":
                return None
            raise
        return content if isinstance(content, dict) else None

    async def room_state(self, room: str) -> list[dict[str, Any]]:
        """Every current state event of the room (as the bot)."""
        events = await self.request("GET", f"/rooms/{q(room)}/state")
        return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []

    async def event(self, room: str, event_id: str) -> dict[str, Any] | None:
        """One event as the bot sees it (redacted events come back pruned), or ``None``."""
        try:
            event = await self.request("GET", f"/rooms/{q(room)}/event/{q(event_id)}")
        except MatrixError as exc:
            if exc.errcode == "M_NOT_FOUND" or exc.status == 404:
                return None
            raise
        return event if isinstance(event, dict) else None

    async def relations(self, room: str, event_id: str, rel_type: str, event_type: str, *,
                        user: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Events relating to ``event_id`` (``/_matrix/client/v1/rooms/.../relations``), newest first."""
        done = await self.request("GET", f"/rooms/{q(room)}/relations/{q(event_id)}/{q(rel_type)}/{q(event_type)}",
                                  user=user, query={"limit": str(limit), "dir": "b"},
                                  base=self.config.homeserver + "/_matrix/client/v1")
        chunk = done.get("chunk") if isinstance(done, dict) else None
        return [e for e in chunk if isinstance(e, dict)] if isinstance(chunk, list) else []

    async def report(self, room: str, event_id: str | None, reason: str, *, member: str | None = None) -> None:
        """Report an event (or, with ``member``, a user: spec v1.13) to the homeserver's admins."""
        if event_id is not None:
            await self.request("POST", f"/rooms/{q(room)}/report/{q(event_id)}", {"reason": reason})
        elif member is not None:
            await self.request("POST", f"/users/{q(member)}/report", {"reason": reason})

    # -- media ----------------------------------------------------------------------------------
    async def upload(self, data: bytes, content_type: str, filename: str | None, *, user: str | None = None) -> str:
        """The ``mxc://`` URI of ``data`` stored in the homeserver's media repository."""
        query = {"filename": filename} if filename else None
        done = await self.request("POST", "/upload", user=user, data=data, content_type=content_type, query=query,
                                  base=self.config.homeserver + "/_matrix/media/v3")
        uri = done.get("content_uri") if isinstance(done, dict) else None
        if not isinstance(uri, str) or not uri.startswith("mxc://"):
            raise MatrixError(502, None, f"upload: the homeserver answered no content_uri: {done!r}")
        return uri

    async def download(self, server: str, media_id: str, *, max_bytes: int) -> tuple[bytes, str, str | None]:
        """(bytes, content type, file name) of a media item (authenticated media,
        spec v1.11); ``MatrixError`` 413 when it is larger than ``max_bytes``."""
        assert self.session is not None, "client not started"
        url = f"{self.config.homeserver}/_matrix/client/v1/media/download/{q(server)}/{q(media_id)}"
        self.calls += 1
        try:
            async with self.session.get(url) as resp:
                if resp.status != 200:
                    raw = await resp.content.read(4096)
                    self.failures += 1
                    raise MatrixError(resp.status, None, f"download {server}/{media_id}: HTTP {resp.status} "
                                                         f"{raw[:200].decode(errors='replace')}")
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise MatrixError(413, "M_TOO_LARGE", f"download {server}/{media_id}: {resp.content_length} "
                                                          f"bytes, more than the limit of {max_bytes}")
                data = await resp.content.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise MatrixError(413, "M_TOO_LARGE", f"download {server}/{media_id}: more than {max_bytes} bytes")
                name = resp.content_disposition.filename if resp.content_disposition else None
                return data, resp.content_type or "application/octet-stream", name
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.failures += 1
            raise MatrixError(0, None, f"download {server}/{media_id}: {type(exc).__name__}: {exc}") from None


def _reason(body: dict[str, Any], reason: str | None) -> dict[str, Any]:
    if reason:
        body["reason"] = reason
    return body


def _event_id(done: Any) -> str:
    event_id = done.get("event_id") if isinstance(done, dict) else None
    if not isinstance(event_id, str):
        raise MatrixError(502, None, f"the homeserver answered no event_id: {done!r}")
    return event_id


# -- ask the homeserver to ping us ------------------------------------------------
class PingError(RuntimeError):
    """The homeserver could not reach the gateway (or refused our ``as_token``).

    ``status`` and ``errcode`` are the homeserver's answer (``status`` 0 when
    the homeserver itself was unreachable), e.g. 502 ``M_BAD_STATUS`` when our
    route answered an error, 502 ``M_CONNECTION_FAILED``, 504
    ``M_CONNECTION_TIMEOUT``, 400 ``M_URL_NOT_SET``, 403 ``M_FORBIDDEN``."""

    def __init__(self, status: int, errcode: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode


async def ping_homeserver(session: aiohttp.ClientSession, config: MatrixConfig, *,
                          transaction_id: str | None = None, timeout: float = 30.0) -> float:
    """``POST /_matrix/client/v1/appservice/{id}/ping`` with the ``as_token``:
    the homeserver calls our ``/ping`` route and answers with the round trip,
    returned here in seconds. It also makes the homeserver retry at once the
    transactions it holds for us (Synapse), so call it at start-up.

    Raises ``PingError`` saying what went wrong."""
    url = f"{config.homeserver}/_matrix/client/v1/appservice/{quote(config.id, safe='')}/ping"
    body = {"transaction_id": transaction_id} if transaction_id is not None else {}
    try:
        async with session.post(url, json=body, headers={"Authorization": f"Bearer {config.as_token}"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            raw = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise PingError(0, None, f"homeserver {config.homeserver} unreachable: {type(exc).__name__}: {exc}") from exc
    try:
        answer = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        answer = {}
    answer = answer if isinstance(answer, dict) else {}
    if status != 200:
        errcode = answer.get("errcode") if isinstance(answer.get("errcode"), str) else None
        detail = answer.get("error") or raw[:200].decode(errors="replace")
        if errcode == "M_BAD_STATUS":
            detail = f"{detail} (our route answered HTTP {answer.get('status')}: {answer.get('body')})"
        raise PingError(status, errcode, f"ping of appservice {config.id!r} via {config.homeserver} failed: "
                                         f"HTTP {status} {errcode or ''} {detail}".rstrip())
    duration = answer.get("duration_ms")
    if not isinstance(duration, (int, float)) or isinstance(duration, bool):
        raise PingError(status, None, f"the homeserver's ping answer has no duration_ms: {answer!r}")
    return float(duration) / 1000.0
