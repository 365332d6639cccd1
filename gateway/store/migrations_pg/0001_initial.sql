-- civic-gateway store, version 1: the PostgreSQL dialect of migrations/0001_initial.sql.
-- Same tables and columns (tests/test_store_postgresql.py compares them). Only
-- PostgreSQL has: outbox.tx (the outbox horizon, see gateway/store/postgresql.py),
-- the index on processed.seen, and the cluster lease tables at the end.

-- Inbound idempotency: an event id seen from a platform is never processed twice.
CREATE TABLE processed (
    platform TEXT NOT NULL,
    event_id TEXT NOT NULL,
    seen     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (platform, event_id)
);
CREATE INDEX processed_seen ON processed (seen);

-- Id mapping (see the SQLite dialect for the meaning of grp and sent).
CREATE TABLE id_map (
    platform  TEXT NOT NULL,
    grp       TEXT NOT NULL,
    kind      TEXT NOT NULL,
    native    TEXT NOT NULL,
    canonical TEXT NOT NULL,
    sent      INTEGER NOT NULL,
    PRIMARY KEY (platform, grp, kind, native)
);
CREATE INDEX id_map_canonical ON id_map (canonical, platform, grp);

-- Transactional outbox: one queue per target group, read in (tx, seq) order and
-- only below the horizon of running transactions (rows there are final).
CREATE TABLE outbox (
    seq      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    platform TEXT NOT NULL,
    grp      TEXT NOT NULL,
    event_id TEXT NOT NULL,
    type     TEXT NOT NULL,
    origin   TEXT NOT NULL,
    created  DOUBLE PRECISION NOT NULL,
    pending  TEXT,
    body     BYTEA NOT NULL,
    tx       xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX outbox_group ON outbox (platform, grp, tx, seq);

CREATE TABLE dead_letters (
    seq       BIGINT PRIMARY KEY,
    platform  TEXT NOT NULL,
    grp       TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    type      TEXT NOT NULL,
    origin    TEXT NOT NULL,
    created   DOUBLE PRECISION NOT NULL,
    pending   TEXT,
    body      BYTEA NOT NULL,
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
    seq       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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

-- PostgreSQL only: the nodes of a cluster and their partition leases (times are
-- the database's clock, seconds since the epoch; an expired lease is free).
CREATE TABLE cluster_nodes (
    node TEXT PRIMARY KEY,
    seen DOUBLE PRECISION NOT NULL
);

CREATE TABLE cluster_leases (
    part    INTEGER PRIMARY KEY,
    owner   TEXT,
    expires DOUBLE PRECISION NOT NULL DEFAULT 0
);
