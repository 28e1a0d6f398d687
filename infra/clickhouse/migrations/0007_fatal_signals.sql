-- One row per process (thread group) killed by SIGKILL, SIGSEGV, SIGBUS or SIGABRT
-- (probe "fatal_signals"), written when its last thread exits. The sender_* columns and
-- code are filled when the signal's generation was seen (sender_known = 1): for a fault
-- or abort() the sender is the process itself, for the OOM killer the allocating task.
CREATE TABLE IF NOT EXISTS fleet.fatal_signals
(
    `time` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `node` LowCardinality(String),
    `pid` UInt32 CODEC(T64, ZSTD(1)),
    `ppid` UInt32 CODEC(T64, ZSTD(1)),
    `uid` UInt32 CODEC(T64, ZSTD(1)),
    `cgroup_id` UInt64 CODEC(T64, ZSTD(1)),
    `comm` LowCardinality(String),
    `signal` UInt8,
    `core_dumped` UInt8,
    `sender_known` UInt8,
    `code` Int32,
    `sender_pid` UInt32 CODEC(T64, ZSTD(1)),
    `sender_uid` UInt32 CODEC(T64, ZSTD(1)),
    `sender_comm` LowCardinality(String),
    `sender_cgroup_id` UInt64 CODEC(T64, ZSTD(1)),
    `delay_ns` UInt64 CODEC(T64, ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (node, time)
TTL toDateTime(time) + INTERVAL 90 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
