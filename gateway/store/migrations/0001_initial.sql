-- civic-gateway store, version 1. Plain SQL that SQLite and PostgreSQL both accept.

-- Inbound idempotency: an event id seen from a platform is never processed twice.
CREATE TABLE processed (
    platform TEXT NOT NULL,
    event_id TEXT NOT NULL,
    seen     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (platform, event_id)
);

-- Id mapping: a native id on one platform (messages: within one group; people:
-- grp = '' except anonymous stand-ins, which are per group) <-> canonical id.
-- sent = 0: the platform's own id; sent = 1: an id the gateway made up and sent
-- there (a stand-in for a person, or a message id before the site named its own).
CREATE TABLE id_map (
    platform  TEXT NOT NULL,
    grp       TEXT NOT NULL,
    kind      TEXT NOT NULL,
    native    TEXT NOT NULL,
    canonical TEXT NOT NULL,
    sent      INTEGER NOT NULL,
    PRIMARY KEY (platform, grp, kind, native)
) WITHOUT ROWID;
CREATE INDEX id_map_canonical ON id_map (canonical, platform, grp);

-- Transactional outbox: one ordered queue per target group (ordered by seq).
CREATE TABLE outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    platform TEXT NOT NULL,
    grp      TEXT NOT NULL,
    event_id TEXT NOT NULL,
    type     TEXT NOT NULL,
    origin   TEXT NOT NULL,
    created  DOUBLE PRECISION NOT NULL,
    pending  TEXT,
    body     BLOB NOT NULL
);
CREATE INDEX outbox_group ON outbox (platform, grp, seq);

CREATE TABLE dead_letters (
    seq       INTEGER PRIMARY KEY,
    platform  TEXT NOT NULL,
    grp       TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    type      TEXT NOT NULL,
    origin    TEXT NOT NULL,
    created   DOUBLE PRECISION NOT NULL,
    pending   TEXT,
    body      BLOB NOT NULL,
    error     TEXT NOT NULL,
    attempts  INTEGER NOT NULL,
    failed_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE memberships (
    platform TEXT NOT NULL,
    grp      TEXT NOT NULL,
    actor    TEXT NOT NULL,
    state    TEXT NOT NULL,
    role     TEXT,
    updated  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (platform, grp, actor)
);

-- The public transparency log of moderation.
CREATE TABLE moderation_log (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    time      DOUBLE PRECISION NOT NULL,
    link      TEXT NOT NULL,
    platform  TEXT NOT NULL,
    grp       TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    moderator TEXT,
    reason    TEXT,
    category  TEXT,
    event_id  TEXT NOT NULL
);

-- People banned across a link (moderation = "mirror"): their messages do not cross it.
CREATE TABLE bans (
    link  TEXT NOT NULL,
    actor TEXT NOT NULL,
    since DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (link, actor)
);

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
