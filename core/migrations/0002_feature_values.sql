-- The offline feature store: every value a feature version ever had, keyed by feature version,
-- entity, event time and write time. One typed column holds the value, by value_type.
CREATE TABLE IF NOT EXISTS feature_values (
    feature      text             NOT NULL CHECK (feature ~ '^[a-z][a-z0-9_]*$'),
    major        bigint           NOT NULL CHECK (major >= 0),
    entity_kind  text             NOT NULL CHECK (entity_kind IN ('user', 'product', 'user_product')),
    entity_id    text             NOT NULL CHECK (entity_id <> ''),
    event_time   timestamptz      NOT NULL,
    written_at   timestamptz      NOT NULL,
    value_type   text             NOT NULL CHECK (value_type IN ('float', 'int', 'string', 'float_vector')),
    float_value  double precision,
    int_value    bigint,
    string_value text,
    vector_value real[],
    -- The primary key is the only index, and it serves every read: a point-in-time lookup is a
    -- backward scan of one entity's rows on (event_time, written_at); snapshots, backfills and
    -- statistics scan one feature version through its prefix. A second index led by
    -- (feature, major, entity_kind) tempts the planner, when a new feature has no statistics yet,
    -- into scanning a whole version for each looked-up entity.
    PRIMARY KEY (feature, major, entity_kind, entity_id, event_time, written_at),
    CHECK (num_nonnulls(float_value, int_value, string_value, vector_value) = 1),
    CHECK (CASE value_type
        WHEN 'float' THEN float_value IS NOT NULL
        WHEN 'int' THEN int_value IS NOT NULL
        WHEN 'string' THEN string_value IS NOT NULL
        ELSE vector_value IS NOT NULL
    END)
);
