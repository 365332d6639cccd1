-- When the event happened at its origin (the CloudEvent time a site sent),
-- carried to the targets; ``created`` stays the time the gateway accepted it.
ALTER TABLE outbox ADD COLUMN occurred DOUBLE PRECISION;
ALTER TABLE dead_letters ADD COLUMN occurred DOUBLE PRECISION;
