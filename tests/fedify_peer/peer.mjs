// A real, independent ActivityPub peer for the gateway's tests, built on the Fedify library
// (npm @fedify/fedify, run with Node 22 from the npm `node` package). Test use only: it serves
// plain http on 127.0.0.1 with Fedify's SSRF guard off (allowPrivateAddress) and keeps everything
// in memory. Started by tests/fedify.py (`Fedify`), which documents the control API.
//
// Actors: every actor lives at /users/{identifier} (Fedify serves all actors from one URI template);
// Persons are created when the control API (or PEER_PERSONS) first names them, Groups (FEP-1b12) when
// PEER_GROUPS or POST /_ctl/actor {type: "Group"} names them. Each has an inbox, an (empty) outbox,
// followers, following, the shared inbox /inbox, an RSA key (publicKey, HTTP Signatures) and an
// Ed25519 key (assertionMethods, Object Integrity Proofs). Follows are accepted automatically. A
// Group announces (Announce, object = the activity embedded) every Create/Update/Delete/Like/
// EmojiReact/Undo addressed to it (to/cc/audience) by one of its followers to all its followers.
import http from "node:http";
import { randomUUID } from "node:crypto";
import { createFederation, MemoryKvStore, InProcessMessageQueue, generateCryptoKeyPair } from "@fedify/fedify";
import {
  Accept, Activity, Announce, Create, Delete, Document, EmojiReact, Endpoints, Flag, Follow,
  Group, Like, Mention, Move, Note, Person, PUBLIC_COLLECTION, Tombstone, Undo, Update, lookupObject, isActor,
} from "@fedify/vocab";
import { getDocumentLoader } from "@fedify/vocab-runtime";
import { Temporal } from "@js-temporal/polyfill";

const PORT = Number(process.env.PORT ?? 8100);
const ORIGIN = `http://127.0.0.1:${PORT}`;
const NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const log = (...a) => console.log(new Date().toISOString(), ...a);

// -- state (all in memory) ----------------------------------------------------------------------
const actors = new Map(); // identifier -> {type, keys, aliases: [url], followers: Map(id -> recipient), following: Map(target -> {follow, accepted})}
const objects = new Map(); // note id (href) -> {owner, note (Note), recipients: [url], deleted}
const sent = new Map(); // activity id (href) -> {owner, activity, recipients: [url], followers: bool}
const received = []; // log entries, oldest first
const outboxErrors = []; // {at, error, activity}
const wire = new Map(); // activity id -> {raw, signature, path}; filled by the HTTP layer before Fedify sees the POST
let seq = 0;

// RSA-2048 like Mastodon's keys (Fedify's generateCryptoKeyPair makes 4096-bit ones: ~1 s each).
const rsaKeyPair = () => crypto.subtle.generateKey({ name: "RSASSA-PKCS1-v1_5", modulusLength: 2048,
  publicExponent: new Uint8Array([1, 0, 1]), hash: "SHA-256" }, true, ["sign", "verify"]);

async function ensureActor(identifier, type = "Person") {
  if (!NAME_RE.test(identifier ?? "")) throw new CtlError(400, `bad actor identifier: ${identifier}`);
  let a = actors.get(identifier);
  if (a == null) {
    a = { type, keys: [await rsaKeyPair(), await generateCryptoKeyPair("Ed25519")],
          aliases: [], followers: new Map(), following: new Map() };
    actors.set(identifier, a);
    log("ACTOR", type, identifier);
  }
  return a;
}

const federation = createFederation({
  kv: new MemoryKvStore(),
  // Inbound activities are handled inside the POST (no inbox queue): when a peer's delivery has been
  // answered 202, the activity is already in the log. Outbound fan-out (Group announces) is queued.
  queue: { outbox: new InProcessMessageQueue(), fanout: new InProcessMessageQueue() },
  allowPrivateAddress: true, // REQUIRED for 127.0.0.1 peers (the SSRF guard refuses them otherwise)
  onOutboxError: (error, activity) => {
    outboxErrors.push({ at: new Date().toISOString(), error: String(error), activity: activity?.id?.href ?? null });
    log("OUTBOX ERROR", activity?.id?.href, String(error));
  },
});
const documentLoader = getDocumentLoader({ allowPrivateAddress: true });
const lookupOpts = { documentLoader, allowPrivateAddress: true };

federation.setActorDispatcher("/users/{identifier}", async (ctx, identifier) => {
  const a = actors.get(identifier);
  if (a == null) return null;
  const kp = await ctx.getActorKeyPairs(identifier);
  const Cls = a.type === "Group" ? Group : Person;
  return new Cls({
    id: ctx.getActorUri(identifier), preferredUsername: identifier, name: `${identifier} (fedify peer)`,
    summary: a.type === "Group" ? "A FEP-1b12 group on the Fedify test peer" : null,
    url: ctx.getActorUri(identifier), inbox: ctx.getInboxUri(identifier), outbox: ctx.getOutboxUri(identifier),
    followers: ctx.getFollowersUri(identifier), following: ctx.getFollowingUri(identifier),
    endpoints: new Endpoints({ sharedInbox: ctx.getInboxUri() }), manuallyApprovesFollowers: false,
    publicKey: kp[0].cryptographicKey, assertionMethods: kp.map((k) => k.multikey),
    aliases: a.aliases.map((u) => new URL(u)),
  });
}).setKeyPairsDispatcher(async (_ctx, identifier) => actors.get(identifier)?.keys ?? []);

federation.setFollowersDispatcher("/users/{identifier}/followers", async (_ctx, identifier) => {
  const a = actors.get(identifier);
  return a == null ? null : { items: [...a.followers.values()] };
}).setCounter((_ctx, identifier) => actors.get(identifier)?.followers.size ?? null);
federation.setFollowingDispatcher("/users/{identifier}/following", async (_ctx, identifier) => {
  const a = actors.get(identifier);
  return a == null ? null : { items: [...a.following.keys()].map((u) => new URL(u)) };
});
federation.setOutboxDispatcher("/users/{identifier}/outbox", async (_ctx, identifier) =>
  actors.has(identifier) ? { items: [] } : null);
federation.setObjectDispatcher(Note, "/users/{identifier}/notes/{id}", async (ctx, values) => {
  const o = objects.get(ctx.getObjectUri(Note, values).href);
  return o == null || o.deleted ? null : o.note;
});

// -- inbox ----------------------------------------------------------------------------------------
const asArray = (v) => (v == null ? [] : Array.isArray(v) ? v : [v]);
const idOf = (v) => (typeof v === "string" ? v : v?.id ?? v?.href ?? null);
function addressed(raw) {
  const out = new Set();
  for (const k of ["to", "cc", "bto", "bcc", "audience"]) for (const v of asArray(raw?.[k])) if (idOf(v)) out.add(idOf(v));
  const obj = raw?.object;
  if (obj && typeof obj === "object") for (const k of ["to", "cc", "audience"]) for (const v of asArray(obj[k])) if (idOf(v)) out.add(idOf(v));
  return out;
}

// The local actors an activity concerns: the inbox's owner, or (shared inbox) those addressed
// directly, through their followers collection, or following the sender.
function concerned(ctx, recipient, raw, senderId) {
  if (recipient != null) return [recipient];
  const to = addressed(raw);
  const out = [];
  for (const [name, a] of actors) {
    const me = ctx.getActorUri(name).href;
    if (to.has(me) || to.has(ctx.getFollowersUri(name).href) || (senderId && a.following.has(senderId))) out.push(name);
  }
  return out;
}

async function record(ctx, activity, extra = {}) {
  const key = activity.id?.href ?? null;
  const w = (key && wire.get(key)) ?? {};
  const raw = w.raw ?? (await activity.toJsonLd({ format: "compact" }));
  const entry = {
    seq: ++seq, received_at: new Date().toISOString(), inbox: ctx.recipient ?? null,
    actors: concerned(ctx, ctx.recipient ?? null, raw, activity.actorId?.href ?? null),
    type: raw.type ?? activity.constructor.name, id: key, sender: activity.actorId?.href ?? null,
    verified: true, signature: w.signature ?? null, activity: raw, ...extra,
  };
  received.push(entry);
  log("INBOX", entry.type, "->", entry.inbox ?? "(shared)", entry.actors.join(","), key, "sig", JSON.stringify(entry.signature));
  return entry;
}

function asRecipient(actor) {
  return { id: actor.id, inboxId: actor.inboxId, endpoints: actor.endpoints ? { sharedInbox: actor.endpoints.sharedInbox } : null };
}

function targetOf(ctx, activity) { // the local actor an activity's object names, if any
  const parsed = activity.objectId ? ctx.parseUri(activity.objectId) : null;
  return parsed?.type === "actor" ? parsed.identifier : null;
}

async function groupAnnounce(ctx, group, activity, entry) {
  const g = actors.get(group);
  const gid = ctx.getActorUri(group).href;
  const sender = activity.actorId?.href;
  const to = addressed(entry.activity);
  if (!to.has(gid) && !to.has(ctx.getFollowersUri(group).href)) { entry.group = { group, announced: null, why: "not addressed to the group" }; return; }
  if (!g.followers.has(sender)) { entry.group = { group, announced: null, why: "sender does not follow the group" }; return; }
  const announce = new Announce({
    id: new URL(`/users/${group}/announces/${randomUUID()}`, ORIGIN), actor: new URL(gid), object: activity,
    to: PUBLIC_COLLECTION, ccs: [ctx.getFollowersUri(group)], audience: new URL(gid), published: Temporal.Now.instant(),
  });
  sent.set(announce.id.href, { owner: group, activity: announce, recipients: [], followers: true });
  entry.group = { group, announced: announce.id.href, why: null };
  await ctx.sendActivity({ identifier: group }, "followers", announce, { preferSharedInbox: false });
  log("GROUP", group, "announced", activity.id?.href, "as", announce.id.href, "to", g.followers.size, "followers");
}

const GROUP_RELAYED = new Set(["Create", "Update", "Delete", "Like", "EmojiReact", "Undo", "Dislike"]);

federation.setInboxListeners("/users/{identifier}/inbox", "/inbox")
  .on(Follow, async (ctx, follow) => {
    const entry = await record(ctx, follow);
    const target = targetOf(ctx, follow);
    const follower = await follow.getActor(ctx);
    if (target == null || !actors.has(target) || follower == null) { entry.accepted = false; return; }
    actors.get(target).followers.set(follower.id.href, asRecipient(follower));
    const me = ctx.getActorUri(target);
    // The Follow is embedded as received (id, actor, object), not with the actor Fedify fetched.
    const embedded = new Follow({ id: follow.id, actor: follow.actorId, object: follow.objectId });
    await ctx.sendActivity({ identifier: target }, follower, new Accept({
      id: new URL(`/users/${target}/accepts/${randomUUID()}`, ORIGIN), actor: me, object: embedded, to: follower.id,
    }));
    entry.accepted = true;
    log("ACCEPTED follow of", target, "by", follower.id.href);
  })
  .on(Accept, async (ctx, accept) => {
    await record(ctx, accept);
    const objId = accept.objectId?.href;
    let matched = false;
    for (const a of actors.values()) for (const f of a.following.values()) if (f.follow === objId) { f.accepted = true; matched = true; }
    if (!matched) { // an Accept naming a Follow id we do not know: accept the sender's pending follows
      for (const a of actors.values()) { const f = a.following.get(accept.actorId?.href); if (f) f.accepted = true; }
    }
  })
  .on(Activity, async (ctx, activity) => {
    const entry = await record(ctx, activity);
    const type = entry.type;
    const sender = activity.actorId?.href;
    if (type === "Undo") { // Undo(Follow): drop the follower
      const inner = entry.activity.object;
      if (inner && typeof inner === "object" && inner.type === "Follow") {
        const followed = idOf(inner.object);
        for (const [name, a] of actors) {
          if (a.followers.has(sender) && (followed == null || followed === ctx.getActorUri(name).href)) {
            a.followers.delete(sender); entry.unfollowed = name;
          }
        }
      }
    }
    if (type === "Reject") {
      for (const a of actors.values()) { const f = a.following.get(sender); if (f) f.accepted = false; }
    }
    if (GROUP_RELAYED.has(type)) {
      const groups = ctx.recipient != null ? [ctx.recipient] : entry.actors;
      for (const name of groups) {
        if (actors.get(name)?.type !== "Group") continue;
        if (entry.unfollowed === name) continue;
        await groupAnnounce(ctx, name, activity, entry);
      }
    }
  })
  .onUnverifiedActivity((_ctx, activity, reason) => {
    const raw = wire.get(activity.id?.href)?.raw ?? null;
    received.push({ seq: ++seq, received_at: new Date().toISOString(), inbox: null, actors: [], type: raw?.type ?? activity.constructor.name,
      id: activity.id?.href ?? null, sender: activity.actorId?.href ?? null, verified: false, reason: reason?.type ?? String(reason),
      signature: wire.get(activity.id?.href)?.signature ?? null, activity: raw });
    log("UNVERIFIED", activity.id?.href, JSON.stringify(reason?.type ?? reason));
  })
  .onError((_ctx, error) => {
    outboxErrors.push({ at: new Date().toISOString(), error: `inbox: ${error}`, activity: null });
    log("INBOX ERROR", error?.stack ?? String(error));
  });

// -- control API ------------------------------------------------------------------------------------
class CtlError extends Error { constructor(status, message) { super(message); this.status = status; } }
const ctlCtx = () => federation.createContext(new URL(ORIGIN), undefined);
const need = (body, ...keys) => { for (const k of keys) if (body[k] == null) throw new CtlError(400, `missing field: ${k}`); };

async function resolveActor(url) {
  const obj = await lookupObject(url, lookupOpts);
  if (obj == null || !isActor(obj)) throw new CtlError(502, `could not resolve an actor at ${url}`);
  return obj;
}

// Addressing: "Public"/"as:Public" -> the public collection, "followers" -> the sender's followers.
function audienceUrls(ctx, name, list) {
  return asArray(list).map((u) => (u === "Public" || u === "as:Public" || u === PUBLIC_COLLECTION.href ? PUBLIC_COLLECTION
    : u === "followers" ? ctx.getFollowersUri(name) : new URL(u)));
}

// Delivery: every addressed URL that resolves to an actor gets the activity in its inbox (others,
// e.g. a remote followers collection, are listed in "skipped"; 502 if nothing is left to deliver to);
// the sender's followers when its followers collection is addressed. immediate unless body.queue;
// to shared inboxes when body.shared_inbox.
async function deliver(ctx, name, activity, urls, body, { followers = false } = {}) {
  const mine = ctx.getFollowersUri(name).href;
  const direct = [];
  let toFollowers = followers;
  const seen = new Set(), skipped = [];
  for (const u of urls) {
    const href = u.href ?? String(u);
    if (href === PUBLIC_COLLECTION.href || seen.has(href)) continue;
    seen.add(href);
    if (href === mine) { toFollowers = true; continue; }
    const parsed = ctx.parseUri(new URL(href));
    if (parsed?.type === "followers") continue; // another local actor's followers: not resolvable as an actor
    let obj = null;
    try { obj = await lookupObject(href, lookupOpts); } catch (e) { log("LOOKUP FAILED", href, String(e)); }
    if (obj != null && isActor(obj)) direct.push(asRecipient(obj));
    else skipped.push(href); // e.g. a remote followers collection: addressed, not delivered to
  }
  if (direct.length === 0 && !toFollowers && skipped.length) throw new CtlError(502, `no actor to deliver to among ${skipped.join(", ")}`);
  const opts = { immediate: !body.queue, preferSharedInbox: !!body.shared_inbox };
  if (direct.length) await ctx.sendActivity({ identifier: name }, direct, activity, opts);
  if (toFollowers && actors.get(name).followers.size) await ctx.sendActivity({ identifier: name }, "followers", activity, opts);
  sent.set(activity.id.href, { owner: name, activity, recipients: direct.map((r) => r.id.href), followers: toFollowers });
  return { delivered_to: direct.map((r) => r.inboxId?.href), followers: toFollowers ? actors.get(name).followers.size : 0, skipped };
}

const newId = (name, kind) => new URL(`/users/${name}/${kind}/${randomUUID()}`, ORIGIN);
const out = async (activity, extra) => ({ id: activity.id.href, activity: await activity.toJsonLd({ format: "compact" }), ...extra });

const POST = {
  async "/_ctl/actor"(ctx, b) {
    need(b, "name");
    const a = await ensureActor(b.name, b.type === "Group" ? "Group" : "Person");
    if (b.also_known_as) a.aliases = asArray(b.also_known_as);
    return { id: ctx.getActorUri(b.name).href, type: a.type, inbox: ctx.getInboxUri(b.name).href };
  },
  async "/_ctl/follow"(ctx, b) {
    need(b, "actor", "target");
    const a = await ensureActor(b.actor);
    const target = await resolveActor(b.target);
    const me = ctx.getActorUri(b.actor);
    const follow = new Follow({ id: newId(b.actor, "follows"), actor: me, object: target.id, to: target.id });
    a.following.set(target.id.href, { follow: follow.id.href, accepted: false, activity: follow });
    const r = await deliver(ctx, b.actor, follow, [target.id], b);
    return out(follow, r);
  },
  async "/_ctl/unfollow"(ctx, b) {
    need(b, "actor", "target");
    const a = await ensureActor(b.actor);
    const f = a.following.get(b.target);
    if (f == null) throw new CtlError(404, `${b.actor} does not follow ${b.target}`);
    const undo = new Undo({ id: newId(b.actor, "undos"), actor: ctx.getActorUri(b.actor), object: f.activity, to: new URL(b.target) });
    a.following.delete(b.target);
    return out(undo, await deliver(ctx, b.actor, undo, [new URL(b.target)], b));
  },
  async "/_ctl/note"(ctx, b) {
    need(b, "actor", "content");
    await ensureActor(b.actor);
    const me = ctx.getActorUri(b.actor);
    const noteUuid = randomUUID();
    const noteId = ctx.getObjectUri(Note, { identifier: b.actor, id: noteUuid });
    const to = audienceUrls(ctx, b.actor, b.to), cc = audienceUrls(ctx, b.actor, b.cc);
    const mentions = asArray(b.mentions).map((u) => new Mention({ href: new URL(u) }));
    const attachments = asArray(b.attachments).map((x) => new Document({ url: new URL(x.url), mediaType: x.mediaType ?? x.media_type ?? null, name: x.name ?? null }));
    const published = Temporal.Now.instant();
    const fields = {
      id: noteId, attribution: me, tos: to, ccs: cc, content: b.content, summary: b.summary ?? null,
      sensitive: b.sensitive ?? null, replyTarget: b.inReplyTo ? new URL(b.inReplyTo) : null,
      audience: b.audience ? new URL(b.audience) : null, tags: mentions, attachments, published, url: noteId,
    };
    const note = new Note(fields);
    const create = new Create({ id: new URL(`${noteId.href}#create`), actor: me, object: note, tos: to, ccs: cc,
      audience: fields.audience, published });
    const urls = [...to, ...cc, ...(fields.audience ? [fields.audience] : []), ...mentions.map((m) => m.href)];
    const r = await deliver(ctx, b.actor, create, urls, b);
    objects.set(noteId.href, { owner: b.actor, note, fields, urls, deleted: false });
    return { id: noteId.href, create: create.id.href, activity: await create.toJsonLd({ format: "compact" }), ...r };
  },
  async "/_ctl/update"(ctx, b) {
    need(b, "actor", "id");
    const o = objects.get(b.id);
    if (o == null || o.owner !== b.actor) throw new CtlError(404, `no note ${b.id} of ${b.actor}`);
    const updated = Temporal.Now.instant();
    o.fields = { ...o.fields, content: b.content ?? o.fields.content, summary: b.summary !== undefined ? b.summary : o.fields.summary,
      sensitive: b.sensitive !== undefined ? b.sensitive : o.fields.sensitive, updated };
    o.note = new Note(o.fields);
    const update = new Update({ id: newId(b.actor, "updates"), actor: ctx.getActorUri(b.actor), object: o.note,
      tos: o.fields.tos, ccs: o.fields.ccs, audience: o.fields.audience, published: updated });
    return out(update, await deliver(ctx, b.actor, update, o.urls, b));
  },
  async "/_ctl/delete"(ctx, b) {
    need(b, "actor", "id");
    const o = objects.get(b.id);
    if (o == null || o.owner !== b.actor) throw new CtlError(404, `no note ${b.id} of ${b.actor}`);
    o.deleted = true;
    const del = new Delete({ id: newId(b.actor, "deletes"), actor: ctx.getActorUri(b.actor),
      object: new Tombstone({ id: new URL(b.id) }), tos: o.fields.tos, ccs: o.fields.ccs, audience: o.fields.audience });
    return out(del, await deliver(ctx, b.actor, del, o.urls, b));
  },
  async "/_ctl/like"(ctx, b) {
    need(b, "actor", "object");
    await ensureActor(b.actor);
    const to = await defaultTo(b);
    const like = new Like({ id: newId(b.actor, "likes"), actor: ctx.getActorUri(b.actor), object: new URL(b.object), tos: to,
      audience: b.audience ? new URL(b.audience) : null });
    return out(like, await deliver(ctx, b.actor, like, [...to, ...(b.audience ? [new URL(b.audience)] : [])], b));
  },
  async "/_ctl/react"(ctx, b) {
    need(b, "actor", "object", "content");
    await ensureActor(b.actor);
    const to = await defaultTo(b);
    const react = new EmojiReact({ id: newId(b.actor, "reactions"), actor: ctx.getActorUri(b.actor), object: new URL(b.object),
      content: b.content, tos: to, audience: b.audience ? new URL(b.audience) : null });
    return out(react, await deliver(ctx, b.actor, react, [...to, ...(b.audience ? [new URL(b.audience)] : [])], b));
  },
  async "/_ctl/undo"(ctx, b) { // undo any activity this peer sent (Like, EmojiReact, Announce, Follow, ...)
    need(b, "actor", "id");
    const s = sent.get(b.id);
    if (s == null || s.owner !== b.actor) throw new CtlError(404, `no activity ${b.id} sent by ${b.actor}`);
    const undo = new Undo({ id: newId(b.actor, "undos"), actor: ctx.getActorUri(b.actor), object: s.activity,
      tos: s.activity.toIds, ccs: s.activity.ccIds, audience: s.activity.audienceId });
    const urls = [...s.recipients.map((u) => new URL(u)), ...(s.activity.audienceId ? [s.activity.audienceId] : [])];
    return out(undo, await deliver(ctx, b.actor, undo, urls, b, { followers: s.followers }));
  },
  async "/_ctl/undo-like"(ctx, b) {
    need(b, "actor");
    let id = b.id;
    if (id == null) {
      need(b, "object");
      for (const [k, s] of sent) if (s.owner === b.actor && s.activity instanceof Like && s.activity.objectId?.href === b.object) id = k;
    }
    if (id == null) throw new CtlError(404, `${b.actor} has not liked ${b.object}`);
    return POST["/_ctl/undo"](ctx, { ...b, id });
  },
  async "/_ctl/announce"(ctx, b) { // a boost by a Person
    need(b, "actor", "object");
    await ensureActor(b.actor);
    const to = await defaultTo(b);
    const ann = new Announce({ id: newId(b.actor, "announces"), actor: ctx.getActorUri(b.actor), object: new URL(b.object),
      tos: [PUBLIC_COLLECTION, ...to], ccs: [ctx.getFollowersUri(b.actor)] });
    return out(ann, await deliver(ctx, b.actor, ann, to, b, { followers: true }));
  },
  async "/_ctl/flag"(ctx, b) {
    need(b, "actor", "object", "to");
    await ensureActor(b.actor);
    const to = asArray(b.to).map((u) => new URL(u));
    const flag = new Flag({ id: newId(b.actor, "flags"), actor: ctx.getActorUri(b.actor),
      objects: asArray(b.object).map((u) => new URL(u)), content: b.content ?? null, tos: to });
    return out(flag, await deliver(ctx, b.actor, flag, to, b));
  },
  async "/_ctl/move"(ctx, b) {
    need(b, "actor", "target");
    await ensureActor(b.actor);
    const me = ctx.getActorUri(b.actor);
    const move = new Move({ id: newId(b.actor, "moves"), actor: me, object: me, target: new URL(b.target),
      tos: [ctx.getFollowersUri(b.actor)] });
    const extra = asArray(b.to).map((u) => new URL(u));
    return out(move, await deliver(ctx, b.actor, move, extra, b, { followers: true }));
  },
  async "/_ctl/also-known-as"(ctx, b) {
    need(b, "actor", "aliases");
    const a = await ensureActor(b.actor);
    a.aliases = asArray(b.aliases);
    return { id: ctx.getActorUri(b.actor).href, alsoKnownAs: a.aliases };
  },
  async "/_ctl/send"(ctx, b) { // any activity given as JSON-LD, signed and delivered by b.actor
    need(b, "actor", "activity");
    await ensureActor(b.actor);
    const json = { "@context": "https://www.w3.org/ns/activitystreams", id: newId(b.actor, "activities").href,
      actor: ctx.getActorUri(b.actor).href, ...b.activity };
    const activity = await Activity.fromJsonLd(json, { documentLoader, contextLoader: documentLoader });
    const urls = [...asArray(b.to ?? json.to), ...asArray(b.cc ?? json.cc)].map((u) => (u === "followers" ? ctx.getFollowersUri(b.actor) : new URL(u)));
    return out(activity, await deliver(ctx, b.actor, activity, urls, b));
  },
  async "/_ctl/clear-log"() { received.length = 0; outboxErrors.length = 0; return { cleared: true }; },
};

async function defaultTo(b) { // Like/EmojiReact/Announce: to the given actors, else to the object's author
  if (b.to != null) return asArray(b.to).map((u) => new URL(u));
  const obj = await lookupObject(b.object, lookupOpts);
  const author = obj?.attributionId ?? obj?.actorId;
  if (author == null) throw new CtlError(400, `no "to" given and ${b.object} has no author to deliver to`);
  return [author];
}

const GET = {
  "/_ctl/log": (ctx, q) => {
    const actor = q.get("actor"), since = Number(q.get("since") ?? 0), type = q.get("type");
    return received.filter((e) => (actor == null || e.actors.includes(actor)) && e.seq > since && (type == null || e.type === type));
  },
  "/_ctl/errors": () => outboxErrors,
  "/_ctl/lookup": async (_ctx, q) => {
    const obj = await lookupObject(q.get("q"), lookupOpts);
    if (obj == null) throw new CtlError(404, `nothing found at ${q.get("q")}`);
    return obj.toJsonLd({ format: "compact" });
  },
  "/_ctl/followers": (ctx, q) => {
    const a = actors.get(q.get("actor"));
    if (a == null) throw new CtlError(404, `no actor ${q.get("actor")}`);
    return { actor: ctx.getActorUri(q.get("actor")).href, followers: [...a.followers.keys()] };
  },
  "/_ctl/following": (ctx, q) => {
    const a = actors.get(q.get("actor"));
    if (a == null) throw new CtlError(404, `no actor ${q.get("actor")}`);
    return { actor: ctx.getActorUri(q.get("actor")).href,
      following: [...a.following].map(([target, f]) => ({ target, follow: f.follow, accepted: f.accepted })) };
  },
  "/_ctl/actors": (ctx) => [...actors].map(([name, a]) => ({ name, type: a.type, id: ctx.getActorUri(name).href })),
};

// -- HTTP -------------------------------------------------------------------------------------------
function signatureOf(headers) {
  if (headers["signature-input"]) {
    const m = /keyid="([^"]+)"/i.exec(headers["signature-input"]);
    return { scheme: "rfc9421", keyId: m ? m[1] : null };
  }
  if (headers.signature) {
    const m = /keyId="([^"]+)"/.exec(headers.signature), alg = /algorithm="([^"]+)"/.exec(headers.signature);
    return { scheme: "draft-cavage", keyId: m ? m[1] : null, algorithm: alg ? alg[1] : null };
  }
  return { scheme: "none", keyId: null };
}

function reply(res, status, body) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, ORIGIN);
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const bodyBuf = Buffer.concat(chunks);
  try {
    if (url.pathname.startsWith("/_ctl/")) {
      const ctx = ctlCtx();
      if (req.method === "GET" && GET[url.pathname]) return reply(res, 200, await GET[url.pathname](ctx, url.searchParams));
      if (req.method === "POST" && POST[url.pathname]) {
        const b = bodyBuf.length ? JSON.parse(bodyBuf.toString("utf8")) : {};
        log("CTL", url.pathname, JSON.stringify(b));
        return reply(res, 200, await POST[url.pathname](ctx, b));
      }
      return reply(res, 404, { error: `unknown control endpoint ${req.method} ${url.pathname}` });
    }
    if (req.method === "POST" && /\/inbox$/.test(url.pathname)) {
      try {
        const raw = JSON.parse(bodyBuf.toString("utf8"));
        if (raw?.id) wire.set(raw.id, { raw, signature: signatureOf(req.headers), path: url.pathname });
      } catch { /* Fedify answers malformed bodies itself */ }
    }
    const headers = new Headers();
    for (const [k, v] of Object.entries(req.headers)) headers.set(k, Array.isArray(v) ? v.join(", ") : v);
    const request = new Request(url, { method: req.method, headers,
      body: ["GET", "HEAD"].includes(req.method) ? undefined : bodyBuf });
    const response = await federation.fetch(request, { contextData: undefined });
    const payload = Buffer.from(await response.arrayBuffer());
    log(`${req.method} ${url.pathname} -> ${response.status}`, req.method === "POST" ? JSON.stringify(signatureOf(req.headers)) : "",
      response.status >= 400 ? payload.toString("utf8").slice(0, 300) : "");
    res.writeHead(response.status, Object.fromEntries(response.headers));
    res.end(payload);
  } catch (e) {
    log("ERR", req.method, url.pathname, e instanceof CtlError ? `${e.status} ${e.message}` : e?.stack ?? String(e));
    if (!res.headersSent) reply(res, e instanceof CtlError ? e.status : 500, { error: String(e?.message ?? e) });
  }
});
for (const n of (process.env.PEER_PERSONS ?? "").split(",").filter(Boolean)) await ensureActor(n, "Person");
for (const n of (process.env.PEER_GROUPS ?? "").split(",").filter(Boolean)) await ensureActor(n, "Group");
server.listen(PORT, "127.0.0.1", () => log(`fedify peer on ${ORIGIN} (actors: ${[...actors.keys()].join(", ") || "none yet"})`));

process.on("SIGTERM", () => { log("SIGTERM: exiting"); process.exit(0); });
