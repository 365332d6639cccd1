-- Fingerprints of events the gateway just sent to a group (deletions,
-- memberships, moderation actions, reports), so that a site echoing one back
-- is recognised by any node, and after a restart. Kept for minutes.
CREATE TABLE sent_fingerprints (
    fingerprint BLOB PRIMARY KEY,
    sent        DOUBLE PRECISION NOT NULL
);
CREATE INDEX sent_fingerprints_sent ON sent_fingerprints (sent);
