-- Statistics on the hour of an event, the grouping key of the data-quality profile: without
-- them the planner takes the hour to have as many values as occurred_at (one per event) and
-- sorts the whole table to group it; with them it expects a few hundred groups and hashes them
-- in parallel. Kept up to date by (auto)ANALYZE; dropped with the column.
CREATE STATISTICS IF NOT EXISTS events_hour
    ON (date_bin('1 hour', occurred_at, '2000-01-01 00:00:00+00')) FROM events;
