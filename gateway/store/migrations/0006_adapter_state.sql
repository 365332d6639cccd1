-- Adapter state: small values a platform adapter keeps between restarts and
-- shares with the other nodes of a cluster (sync tokens, policy-list snapshots,
-- the ids it has seen), one key space per platform. Keys compare by code point
-- (SQLite's BINARY collation), so a prefix is a range of the primary key.
CREATE TABLE adapter_state (
    platform TEXT NOT NULL,
    key      TEXT NOT NULL,
    value    BLOB NOT NULL,
    updated  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (platform, key)
);
