-- One row per stored batch: (node, stream, epoch, sequence) makes gaps and duplicates
-- visible in SQL. Inserted after the batch's rows, with the same deduplication token.
CREATE TABLE IF NOT EXISTS fleet.batches
(
    `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta(8), ZSTD(1)),
    `created` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `node` LowCardinality(String),
    `machine_id` LowCardinality(String),
    `kernel_release` LowCardinality(String),
    `agent_version` LowCardinality(String),
    `stream` LowCardinality(String),
    `epoch` UInt64,
    `sequence` UInt64,
    `batch_id` String,
    `rows` UInt32
)
ENGINE = MergeTree
PARTITION BY toDate(inserted_at)
ORDER BY (node, stream, epoch, sequence)
TTL toDateTime(inserted_at) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
