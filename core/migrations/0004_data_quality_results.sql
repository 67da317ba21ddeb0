-- Data-quality results: one row per check per run (the data-quality job, and the checks that
-- cf-train and the feature jobs run on their own input).
CREATE TABLE IF NOT EXISTS data_quality_results (
    run_id      text             NOT NULL CHECK (run_id <> ''),
    job         text             NOT NULL,
    check_name  text             NOT NULL CHECK (check_name <> ''),
    check_type  text             NOT NULL CHECK (check_type IN ('schema', 'freshness', 'completeness', 'validity', 'volume', 'drift')),
    target      text             NOT NULL,
    observed    double precision,
    threshold   double precision,
    verdict     text             NOT NULL CHECK (verdict IN ('pass', 'warn', 'fail', 'skipped')),
    blocking    boolean          NOT NULL,
    message     text             NOT NULL,
    checked_at  timestamptz      NOT NULL,
    PRIMARY KEY (run_id, check_name, target)
);

-- The latest verdict of a check on a target (what a gate or a dashboard asks).
CREATE INDEX IF NOT EXISTS data_quality_results_latest
    ON data_quality_results (target, check_name, checked_at DESC);
CREATE INDEX IF NOT EXISTS data_quality_results_checked_at ON data_quality_results (checked_at);
