-- Block I/O latency histograms (probe "block_io_latency", block:block_rq_issue to
-- block:block_rq_complete), aggregated in the kernel: one row per node, interval, disk and
-- operation (read, write, discard, flush, other). buckets[i] (i = 1..32 in SQL) counts
-- latencies in [2^(i-1), 2^i) ns, buckets[32] from 2^31 ns up. count = arraySum(buckets).
CREATE TABLE IF NOT EXISTS fleet.block_io_latency
(
    `time` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `interval_s` Float64 CODEC(ZSTD(1)),
    `node` LowCardinality(String),
    `dev_major` UInt32 CODEC(T64, ZSTD(1)),
    `dev_minor` UInt32 CODEC(T64, ZSTD(1)),
    `device` LowCardinality(String),
    `operation` LowCardinality(String),
    `count` UInt64 CODEC(T64, ZSTD(1)),
    `sum_ns` UInt64 CODEC(T64, ZSTD(1)),
    `buckets` Array(UInt64) CODEC(ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (node, device, operation, time)
TTL toDateTime(time) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
