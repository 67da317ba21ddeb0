-- Interaction events: the input of every batch job.
CREATE TABLE IF NOT EXISTS events (
    event_id    text        PRIMARY KEY,
    user_id     text        NOT NULL CHECK (user_id <> ''),
    product_id  text        NOT NULL CHECK (product_id <> ''),
    event_type  text        NOT NULL CHECK (event_type IN ('view', 'click', 'add_to_cart', 'purchase', 'rating')),
    occurred_at timestamptz NOT NULL,
    value       real        CHECK (value IS NULL OR value = value AND value NOT IN ('Infinity', '-Infinity')),
    category    text,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    CHECK (event_type <> 'rating' OR value IS NOT NULL)
);

CREATE INDEX IF NOT EXISTS events_occurred_at ON events (occurred_at);
CREATE INDEX IF NOT EXISTS events_user_id ON events (user_id, occurred_at);
CREATE INDEX IF NOT EXISTS events_product_id ON events (product_id, occurred_at);
CREATE INDEX IF NOT EXISTS events_ingested_at ON events (ingested_at);
