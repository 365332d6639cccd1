"""A tiny community site speaking signed webhooks: used by ``civic-gateway demo``
and the reference for people building a site (see docs/webhook.md).

Everything is in memory. Posting stores a message under the site's own id and
queues a signed CloudEvent for the gateway; ``POST /civic/inbox`` checks the
gateway's signature, skips event ids already seen, applies the events and
answers with the ids it gave new messages. It deliberately imports neither
``schemas`` nor ``adapters``: a site needs only HTTP, JSON and HMAC.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.tasks import TaskGroup

log = logging.getLogger("civic.demo")

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
TEMPLATE = Path(__file__).with_name("static") / "index.html"
THEMES = ("neighbourhood", "patients")  # colours live in the page's CSS
VERBS = {"invited": "was invited", "kicked": "was removed", "banned": "was banned", "unbanned": "was unbanned"}


# -- Standard Webhooks signing: all the crypto a site needs ---------------------
def sign(key: bytes, msg_id: str, ts: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verified(key: bytes, headers: Any, body: bytes) -> bool:
    msg_id, ts = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not ts.isdigit() or abs(time.time() - int(ts)) > 300:
        return False
    expected = sign(key, msg_id, int(ts), body).encode()
    return any(hmac.compare_digest(s.encode(), expected) for s in headers.get("webhook-signature", "").split())


@dataclass
class Board:
    platform: str
    group: str
    events_url: str
    key: bytes
    timeline: list[dict[str, Any]] = field(default_factory=list)  # messages and system lines, oldest first
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)  # own id -> message
    by_gateway_id: dict[str, str] = field(default_factory=dict)  # id the gateway sent -> own id
    seen_events: dict[str, dict[str, str]] = field(default_factory=dict)  # event id -> the ids we answered
    members: set[str] = field(default_factory=set)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_error: str | None = None
    counter: int = 0

    def find(self, mid: Any) -> dict[str, Any] | None:
        """A message by the site's own id or by the id the gateway gave it."""
        return self.messages.get(mid) or self.messages.get(self.by_gateway_id.get(mid))  # type: ignore[arg-type]

    def add(self, author: dict[str, Any], text: str, warning: str | None, sensitive: bool,
            reply_to: str | None, origin: str | None) -> dict[str, Any]:
        self.counter += 1
        parent = self.find(reply_to)
        msg = {"kind": "message", "id": f"{self.platform}-{self.counter}", "author": author, "text": text,
               "warning": warning, "sensitive": sensitive, "reply_to": parent and parent["id"],
               "origin": origin, "reactions": {}, "edited": False, "time": time.time()}
        self.messages[msg["id"]] = msg
        self.timeline.append(msg)
        return msg

    def remove(self, msg: dict[str, Any] | None) -> None:
        if msg is not None and self.messages.pop(msg["id"], None) is not None:
            self.timeline.remove(msg)

    def system(self, text: str) -> None:
        self.timeline.append({"kind": "system", "text": text, "time": time.time()})

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        """Queue one CloudEvent (with the site's own ids) for the sender task."""
        self.outbox.append({"specversion": "1.0", "id": str(uuid.uuid4()), "type": type_,
                            "source": f"urn:civic-demo:{self.platform}", "subject": self.group,
                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data": data})
        self.wake.set()


STATE = web.AppKey("board", Board)


def who(person: dict[str, Any] | None) -> str:
    return (person or {}).get("name") or "someone"


# -- Sending to the gateway ---------------------------------------------------------
async def sender(board: Board, http: aiohttp.ClientSession) -> None:
    """Posts queued events in order, up to 100 per request. Network trouble, 408,
    429 and 5xx are retried later with the same event ids; other answers are final."""
    delay = 1.0
    while True:
        if not board.outbox:
            board.wake.clear()
            await board.wake.wait()
        events = board.outbox[:100]
        body = json.dumps(events[0] if len(events) == 1 else events).encode()
        msg_id, ts = f"msg_{uuid.uuid4().hex}", int(time.time())
        headers = {"content-type": SINGLE if len(events) == 1 else BATCH, "webhook-id": msg_id,
                   "webhook-timestamp": str(ts), "webhook-signature": sign(board.key, msg_id, ts, body)}
        try:
            async with http.post(board.events_url, data=body, headers=headers) as resp:
                status, text, retry_after = resp.status, await resp.text(), resp.headers.get("Retry-After", "")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status, text, retry_after = 0, f"gateway unreachable ({type(exc).__name__})", ""
        if status == 0 or status in (408, 429) or status >= 500:
            board.last_error = text[:200] or f"gateway answered {status}"
            await asyncio.sleep(float(retry_after) if retry_after.isdigit() else delay)
            delay = min(delay * 2, 30.0)
            continue
        del board.outbox[:len(events)]
        delay, board.last_error = 1.0, None if status < 300 else f"gateway refused: {status} {text[:200]}"
        if status >= 300:  # 400, 401, 404, 413, 415: sending it again would not help
            log.warning("gateway refused %d events: %s %s", len(events), status, text)


# -- Receiving from the gateway -------------------------------------------------------
def apply(board: Board, ev: dict[str, Any], ids: dict[str, str]) -> None:
    """Apply one CloudEvent from the gateway; a new message's own id goes into ``ids``."""
    type_, data = ev.get("type"), ev.get("data") or {}
    reason = f": {data['reason']}" if data.get("reason") else ""
    if type_ == "civic.message.created":
        if data["id"] not in board.by_gateway_id:
            author = {"identity": "pseudonymous"} | data["author"]  # a default the gateway may leave out
            msg = board.add(author, data.get("text", ""), data.get("warning"), data.get("sensitive", False),
                            data.get("reply_to"), ev.get("civicorigin") or "another site")
            board.by_gateway_id[data["id"]] = msg["id"]
        ids[data["id"]] = board.by_gateway_id[data["id"]]
    elif type_ == "civic.message.edited" and (msg := board.find(data.get("id"))):
        msg.update(text=data.get("text", ""), warning=data.get("warning"),
                   sensitive=data.get("sensitive", False), edited=True)
    elif type_ == "civic.message.deleted":
        board.remove(board.find(data.get("id")))
    elif type_ in ("civic.reaction.added", "civic.reaction.removed") and (msg := board.find(data.get("message"))):
        keys = msg["reactions"].setdefault(data["author"]["id"], set())
        (keys.add if type_ == "civic.reaction.added" else keys.discard)(data["key"])
    elif type_ == "civic.membership.changed":
        state = data.get("state", "")
        verb = f"became {data.get('role')}" if state == "role_changed" else VERBS.get(state, state)
        board.system(f"{who(data.get('member'))} {verb}{reason}")
    elif type_ == "civic.moderation.action" and data.get("action") == "remove_message":
        board.remove(board.find(data.get("message")))
        board.system(f"a moderator removed a message{reason}")
    elif type_ == "civic.moderation.action":
        board.system(f"a moderator applied {data.get('action')} to {who(data.get('member'))}{reason}")
    # profile.updated, report.filed and account.moved matter to sites with profiles or a moderators' view.


async def inbox(request: web.Request) -> web.Response:
    board, body = request.app[STATE], await request.read()
    if not verified(board.key, request.headers, body):
        return web.json_response({"error": "bad or missing signature"}, status=401)
    if request.content_type not in (SINGLE, BATCH):
        return web.json_response({"error": f"send {SINGLE} or {BATCH}"}, status=415)
    try:
        parsed = json.loads(body)
        events = parsed if request.content_type == BATCH else [parsed]
        if not all(isinstance(e, dict) and isinstance(e.get("id"), str) for e in events):
            raise ValueError("every event needs an id")
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    ids: dict[str, str] = {}
    for ev in events:
        if ev["id"] not in board.seen_events:  # a redelivered event changes nothing, but gets the same answer
            try:
                apply(board, ev, board.seen_events.setdefault(ev["id"], {}))
            except (KeyError, TypeError, AttributeError) as exc:
                log.warning("skipping malformed event %s: %r", ev["id"], exc)
        ids.update(board.seen_events[ev["id"]])
    return web.json_response({"ids": ids})


# -- The page and its small JSON API ---------------------------------------------------
async def list_messages(request: web.Request) -> web.Response:
    """The timeline for the page; reactions are a set of emoji, never counted."""
    board = request.app[STATE]
    entries = [e if e["kind"] == "system" else e | {"reactions": sorted(set().union(*e["reactions"].values()))}
               for e in board.timeline]
    return web.json_response({"timeline": entries, "waiting": len(board.outbox), "error": board.last_error})


async def form(request: web.Request) -> tuple[Board, dict[str, Any], dict[str, Any]]:
    body = await request.json()
    name, identity = str(body.get("name", "")).strip()[:80], body.get("identity", "pseudonymous")
    if not name or identity not in ("anonymous", "pseudonymous", "identified"):
        raise web.HTTPBadRequest(text="a name and an identity level are needed")
    author = {"id": f"user:{name}", "identity": identity}  # an anonymous person's name is never sent
    return request.app[STATE], body, author if identity == "anonymous" else author | {"name": name}


def wire(msg: dict[str, Any]) -> dict[str, Any]:
    """A message as the ``data`` of civic.message.created or .edited."""
    data = {k: msg[k] for k in ("id", "author", "text", "warning", "reply_to") if msg[k]}
    return data | {"sensitive": True} if msg["sensitive"] else data


async def post_message(request: web.Request) -> web.Response:
    board, body, author = await form(request)
    text, warning = str(body.get("text", "")).strip(), str(body.get("warning", "")).strip()
    if not text:
        raise web.HTTPBadRequest(text="write something first")
    if author["id"] not in board.members:
        board.members.add(author["id"])
        board.system(f"{who(author)} joined")
        board.emit("civic.membership.changed", {"member": author, "state": "joined"})
    msg = board.add(author, text, warning or None, bool(warning), body.get("reply_to"), None)
    board.emit("civic.message.created", wire(msg))
    return web.json_response({"id": msg["id"]}, status=201)


async def change_message(request: web.Request) -> web.Response:
    """PUT edits, DELETE deletes: only the author's own posts made on this site."""
    board, body, author = await form(request)
    msg = board.messages.get(request.match_info["id"])
    if msg is None or msg["origin"] is not None or msg["author"]["id"] != author["id"]:
        raise web.HTTPForbidden(text="only your own posts on this site")
    if request.method == "DELETE":
        board.remove(msg)
        board.emit("civic.message.deleted", {"id": msg["id"], "by": author})
    else:
        warning = str(body.get("warning", msg["warning"] or "")).strip()
        msg.update(text=str(body.get("text", "")).strip() or msg["text"], warning=warning or None,
                   sensitive=bool(warning), edited=True)
        board.emit("civic.message.edited", wire(msg))
    return web.json_response({"id": msg["id"]})


async def react(request: web.Request) -> web.Response:
    """Toggles the person's own 👍 (civic.reaction.added, then .removed)."""
    board, _, author = await form(request)
    if (msg := board.messages.get(request.match_info["id"])) is None:
        raise web.HTTPNotFound(text="no such message")
    keys = msg["reactions"].setdefault(author["id"], set())
    added = "👍" not in keys
    (keys.add if added else keys.discard)("👍")
    board.emit(f"civic.reaction.{'added' if added else 'removed'}", {"message": msg["id"], "author": author, "key": "👍"})
    return web.json_response({"added": added})


def make_site_app(*, title: str, platform: str, group: str, gateway_url: str, secret: str,
                  theme: str) -> web.Application:
    """One demo site: the page at ``/``, its JSON at ``/api/...`` and the gateway's
    inbox at ``/civic/inbox``. ``secret`` is the ``whsec_...`` it shares with the
    gateway; ``theme`` is "neighbourhood" (green) or "patients" (blue)."""
    key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    board = Board(platform, group, f"{gateway_url.rstrip('/')}/v1/platforms/{platform}/events", key)
    app = web.Application()
    app[STATE], text = board, TEMPLATE.read_text(encoding="utf-8")
    for name, value in {"TITLE": title, "THEME": theme if theme in THEMES else THEMES[0],
                        "PLATFORM": platform, "GROUP": group}.items():
        text = text.replace(f"__{name}__", html.escape(value))

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/html")

    app.add_routes([web.get("/", page), web.get("/api/messages", list_messages), web.post("/api/messages", post_message),
                    web.put("/api/messages/{id}", change_message), web.delete("/api/messages/{id}", change_message),
                    web.post("/api/messages/{id}/reactions", react), web.post("/civic/inbox", inbox)])

    async def run_sender(app: web.Application) -> AsyncIterator[None]:
        tasks = TaskGroup()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            tasks.spawn(sender(board, http), name=f"demo-sender-{platform}")
            yield
            await tasks.close()

    app.cleanup_ctx.append(run_sender)
    return app


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on loopback (port 0: any free port, see ``runner.addresses``) until ``runner.cleanup()``."""
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("the demo sites listen on 127.0.0.1 only")
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
