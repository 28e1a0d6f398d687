-- One row per successful execve (probe "process", tracepoint sched:sched_process_exec).
-- non_replicated_deduplication_window makes insert_deduplication_token (the batch id)
-- work on a plain MergeTree, so a redelivered batch is stored once.
CREATE TABLE IF NOT EXISTS fleet.process_exec
(
    `time` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `node` LowCardinality(String),
    `pid` UInt32 CODEC(T64, ZSTD(1)),
    `ppid` UInt32 CODEC(T64, ZSTD(1)),
    `uid` UInt32 CODEC(T64, ZSTD(1)),
    `cgroup_id` UInt64 CODEC(T64, ZSTD(1)),
    `comm` LowCardinality(String),
    `filename` LowCardinality(String),
    `args` String CODEC(ZSTD(1)),
    `argc` UInt32 CODEC(T64, ZSTD(1)),
    `args_truncated` UInt8
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (node, time)
TTL toDateTime(time) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
