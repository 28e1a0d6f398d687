-- The pipeline's counters per node, stage and event kind, one row per report interval.
-- value is the increase since the previous report (sum() over a range is the total).
-- stage kernel: emitted (records the probe produced), dropped (ring buffer full);
-- stage agent: records_read, rows_shipped, batches_shipped, rows_dropped, batches_dropped;
-- stage ingester: batches_decoded, batches_inserted, rows_inserted, batches_duplicate,
-- batches_dead_lettered.
CREATE TABLE IF NOT EXISTS fleet.pipeline_stats
(
    `time` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `node` LowCardinality(String),
    `stage` LowCardinality(String),
    `component` LowCardinality(String),
    `stream` LowCardinality(String),
    `counter` LowCardinality(String),
    `value` UInt64 CODEC(T64, ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (node, stream, stage, counter, time)
TTL toDateTime(time) + INTERVAL 90 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
