-- The feature registry: one row per version of a feature definition. Versions are immutable;
-- the lifecycle (deprecated, retired) is recorded beside the spec.
CREATE TABLE IF NOT EXISTS feature_registry (
    name          text        NOT NULL CHECK (name ~ '^[a-z][a-z0-9_]*$'),
    version       text        NOT NULL CHECK (version <> ''),
    major         bigint      NOT NULL CHECK (major >= 0),
    entity        text        NOT NULL CHECK (entity IN ('user', 'product', 'user_product')),
    value_type    text        NOT NULL,
    owner         text        NOT NULL,
    tags          text[]      NOT NULL DEFAULT '{}',
    spec          jsonb       NOT NULL,
    registered_at timestamptz NOT NULL,
    deprecated_at timestamptz,
    replaced_by   text,
    retired_at    timestamptz,
    PRIMARY KEY (name, version),
    CHECK (retired_at IS NULL OR deprecated_at IS NOT NULL)
);

-- Discovery by entity, owner and tag.
CREATE INDEX IF NOT EXISTS feature_registry_entity ON feature_registry (entity);
CREATE INDEX IF NOT EXISTS feature_registry_owner ON feature_registry (owner);
CREATE INDEX IF NOT EXISTS feature_registry_tags ON feature_registry USING gin (tags);
CREATE INDEX IF NOT EXISTS feature_registry_major ON feature_registry (name, major);

-- Materialization runs of a feature version, one row per run (kept out of the spec, unlike
-- Feast, whose run intervals grow inside the registry blob).
CREATE TABLE IF NOT EXISTS feature_materializations (
    name        text        NOT NULL,
    major       bigint      NOT NULL CHECK (major >= 0),
    at          timestamptz NOT NULL,
    row_count   bigint      NOT NULL CHECK (row_count >= 0),
    recorded_at timestamptz NOT NULL,
    PRIMARY KEY (name, major, at)
);
