-- Events per hour and event type, kept by the database as events are written, so that the
-- volume check's baseline (four weeks of hours) is read from a few thousand rows instead of
-- a pass over every event (the approach of Deequ's incremental metrics, kept in Postgres).
--
-- - Kept by statement-level triggers with transition tables: any writer (the scorer, a backfill,
--   COPY, psql) keeps it exact in the same transaction, at the cost of one small aggregate per
--   statement. TRUNCATE empties it.
-- - `slot` spreads concurrent writers (by backend) over several rows of the same hour, so that
--   two scorer replicas ingesting at once do not queue on one row lock. Readers sum the slots.
-- - `event_type` is the stored type when it is a known one, '' when missing, and
--   '(unknown types)' otherwise, so that a flood of made-up types cannot grow the table.
-- - If keeping it fails (a column changed by hand), the write goes on and the rollup is marked
--   invalid; the data-quality job then reads the events themselves and rebuilds it with
--   `recsys_events_hourly_rebuild()`. The job also compares the rollup with the events of its
--   check window on every run, and rebuilds on a difference.
CREATE TABLE IF NOT EXISTS events_hourly (
    hour       timestamptz NOT NULL,
    event_type text        NOT NULL,
    slot       smallint    NOT NULL,
    events     bigint      NOT NULL,
    PRIMARY KEY (hour, event_type, slot)
);

CREATE TABLE IF NOT EXISTS events_hourly_state (
    one        boolean     PRIMARY KEY DEFAULT true CHECK (one),
    valid      boolean     NOT NULL,
    reason     text,
    changed_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION recsys_events_hour_label(t text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN t IS NULL OR t = '' THEN ''
        WHEN t IN ('view', 'click', 'add_to_cart', 'purchase', 'rating') THEN t
        ELSE '(unknown types)'
    END
$$;

CREATE OR REPLACE FUNCTION recsys_events_hourly_keep() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    s smallint := (pg_backend_pid() % 8)::smallint;
BEGIN
    BEGIN
        IF TG_OP = 'TRUNCATE' THEN
            DELETE FROM events_hourly;
            RETURN NULL;
        END IF;
        -- Ordered by key, so that two writers in one slot lock rows in the same order.
        IF TG_OP = 'INSERT' THEN
            INSERT INTO events_hourly AS h (hour, event_type, slot, events)
            SELECT date_bin('1 hour', occurred_at, '2000-01-01 00:00:00+00'),
                   recsys_events_hour_label(event_type), s, count(*)
            FROM recsys_new_events WHERE occurred_at IS NOT NULL
            GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (hour, event_type, slot) DO UPDATE SET events = h.events + excluded.events;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO events_hourly AS h (hour, event_type, slot, events)
            SELECT date_bin('1 hour', occurred_at, '2000-01-01 00:00:00+00'),
                   recsys_events_hour_label(event_type), s, -count(*)
            FROM recsys_old_events WHERE occurred_at IS NOT NULL
            GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (hour, event_type, slot) DO UPDATE SET events = h.events + excluded.events;
        ELSE
            INSERT INTO events_hourly AS h (hour, event_type, slot, events)
            SELECT hour, label, s, sum(n) FROM (
                SELECT date_bin('1 hour', occurred_at, '2000-01-01 00:00:00+00') AS hour,
                       recsys_events_hour_label(event_type) AS label, count(*) AS n
                FROM recsys_new_events WHERE occurred_at IS NOT NULL GROUP BY 1, 2
                UNION ALL
                SELECT date_bin('1 hour', occurred_at, '2000-01-01 00:00:00+00'),
                       recsys_events_hour_label(event_type), -count(*)
                FROM recsys_old_events WHERE occurred_at IS NOT NULL GROUP BY 1, 2
            ) d
            GROUP BY 1, 2 HAVING sum(n) <> 0 ORDER BY 1, 2
            ON CONFLICT (hour, event_type, slot) DO UPDATE SET events = h.events + excluded.events;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        -- Never fail the write for the rollup's sake: mark it, and let the next check rebuild.
        UPDATE events_hourly_state
        SET valid = false, reason = TG_OP || ': ' || SQLERRM, changed_at = now();
        RAISE WARNING 'events_hourly not kept (%): %; the next data-quality run rebuilds it',
            TG_OP, SQLERRM;
    END;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS events_hourly_insert ON events;
CREATE TRIGGER events_hourly_insert AFTER INSERT ON events
    REFERENCING NEW TABLE AS recsys_new_events
    FOR EACH STATEMENT EXECUTE FUNCTION recsys_events_hourly_keep();
DROP TRIGGER IF EXISTS events_hourly_delete ON events;
CREATE TRIGGER events_hourly_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS recsys_old_events
    FOR EACH STATEMENT EXECUTE FUNCTION recsys_events_hourly_keep();
DROP TRIGGER IF EXISTS events_hourly_update ON events;
CREATE TRIGGER events_hourly_update AFTER UPDATE ON events
    REFERENCING OLD TABLE AS recsys_old_events NEW TABLE AS recsys_new_events
    FOR EACH STATEMENT EXECUTE FUNCTION recsys_events_hourly_keep();
DROP TRIGGER IF EXISTS events_hourly_truncate ON events;
CREATE TRIGGER events_hourly_truncate AFTER TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION recsys_events_hourly_keep();

-- Rebuilds the rollup from the events, holding writers (not readers) off for one grouped pass.
CREATE OR REPLACE FUNCTION recsys_events_hourly_rebuild() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    LOCK TABLE events IN SHARE MODE;
    DELETE FROM events_hourly;
    INSERT INTO events_hourly (hour, event_type, slot, events)
    SELECT date_bin('1 hour', occurred_at, '2000-01-01 00:00:00+00'),
           recsys_events_hour_label(event_type), 0, count(*)
    FROM events WHERE occurred_at IS NOT NULL
    GROUP BY 1, 2;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO events_hourly_state (valid, reason) VALUES (true, NULL)
    ON CONFLICT (one) DO UPDATE SET valid = true, reason = NULL, changed_at = now();
    RETURN n;
END
$$;

SELECT recsys_events_hourly_rebuild();
