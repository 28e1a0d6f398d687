-- One row per process (thread group) exit (probe "process", tracepoint sched:sched_process_exit).
CREATE TABLE IF NOT EXISTS fleet.process_exit
(
    `time` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `node` LowCardinality(String),
    `pid` UInt32 CODEC(T64, ZSTD(1)),
    `ppid` UInt32 CODEC(T64, ZSTD(1)),
    `cgroup_id` UInt64 CODEC(T64, ZSTD(1)),
    `comm` LowCardinality(String),
    `exit_code` Int32 CODEC(T64, ZSTD(1)),
    `signal` UInt32 CODEC(T64, ZSTD(1)),
    `duration_ns` UInt64 CODEC(T64, ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (node, time)
TTL toDateTime(time) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
