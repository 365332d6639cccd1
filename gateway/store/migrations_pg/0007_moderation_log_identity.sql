-- The public moderation log shows a person only as their identity level allows
-- (gateway/transparency.py): each row now keeps the level of the member acted
-- on and of the moderator, and a name only where that level lets it be shown.
ALTER TABLE moderation_log ADD COLUMN subject_identity TEXT;
ALTER TABLE moderation_log ADD COLUMN subject_name TEXT;
ALTER TABLE moderation_log ADD COLUMN moderator_identity TEXT;

-- Rows written before this kept every moderator's name whatever their level,
-- which is not known now: forget the names. These rows show no person at all
-- (no level), only "a member" and "a moderator of group ...".
UPDATE moderation_log SET moderator = NULL;
