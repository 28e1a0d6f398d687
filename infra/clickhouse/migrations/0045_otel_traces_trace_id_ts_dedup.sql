-- Every MergeTree table of fleet keeps the hashes of its last 10000 inserted blocks, so an
-- insert repeated with the same insert_deduplication_token (a batch delivered again after a
-- crash or a rebalance) is stored once; tests/unit/test_migrations.py checks it table by table.
-- otel_traces_trace_id_ts is filled by its materialized view, which ClickHouse skips when the
-- otel_traces insert itself was deduplicated, and min/max are idempotent anyway: the window
-- is here so that the rule has no exception to remember.
ALTER TABLE fleet.otel_traces_trace_id_ts MODIFY SETTING non_replicated_deduplication_window = 10000
