-- Adapter state: small values a platform adapter keeps between restarts and
-- shares with the other nodes of a cluster (sync tokens, policy-list snapshots,
-- the ids it has seen), one key space per platform. Keys use the "C" collation
-- so that they compare by code point, as in SQLite, whatever the database's
-- locale: scans come back in the same order on both, and a prefix is a range of
-- the primary key.
CREATE TABLE adapter_state (
    platform TEXT NOT NULL,
    key      TEXT COLLATE "C" NOT NULL,
    value    BYTEA NOT NULL,
    updated  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (platform, key)
);
