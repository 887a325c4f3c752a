-- Herald's Postgres change feed: the outbox table, and a trigger that fills it
-- from an application table (here `jobs`). `herald feed postgres` follows the
-- outbox and publishes each row (gateway/feed/mapping.py says to which channel).
--
--   psql "$DATABASE_URL" -f outbox.sql          (idempotent: safe to run again)
--
-- The trigger writes in the same transaction as the change, so a change is in
-- the outbox exactly when it committed; the feed deletes a row only after
-- Herald took its publication (idempotency key `feed:<id>`), so a crash in
-- between republishes it and Herald drops the duplicate.

CREATE TABLE IF NOT EXISTS herald_outbox (
    id          bigserial PRIMARY KEY,
    table_name  text        NOT NULL,            -- which mapping applies
    op          text        NOT NULL,            -- INSERT, UPDATE, DELETE
    row_data    jsonb       NOT NULL,            -- the row after the change (before, for DELETE)
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Rows the feed could not map or Herald refused for good (too big, unknown
-- channel, another owner): kept with the reason, never silently dropped.
CREATE TABLE IF NOT EXISTS herald_outbox_dead (
    id          bigint      PRIMARY KEY,
    table_name  text        NOT NULL,
    op          text        NOT NULL,
    row_data    jsonb       NOT NULL,
    created_at  timestamptz NOT NULL,
    reason      text        NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION herald_outbox_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO herald_outbox (table_name, op, row_data)
    VALUES (TG_TABLE_NAME, TG_OP, to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END));
    RETURN NULL;
END;
$$;

-- Wakes the feed at once instead of at its next poll (one notification per statement).
CREATE OR REPLACE FUNCTION herald_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('herald_outbox', '');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS herald_outbox_notify ON herald_outbox;
CREATE TRIGGER herald_outbox_notify AFTER INSERT ON herald_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION herald_outbox_notify();

-- The application's table: attach the capture trigger to every table the
-- feed maps. For a `jobs` table (Supabase-style: id, user_id, status,
-- progress, stage, message):
--
--   CREATE TRIGGER herald_outbox AFTER INSERT OR UPDATE ON jobs
--       FOR EACH ROW EXECUTE FUNCTION herald_outbox_capture();
