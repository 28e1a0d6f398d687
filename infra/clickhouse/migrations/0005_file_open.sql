-- One row per open/openat/openat2/creat that failed, opened a path under one of
-- file_open_prefixes, or any open with file_open_all (probe "file_open").
-- path is as passed to the syscall: relative paths are relative to dfd (-100: the cwd).
CREATE TABLE IF NOT EXISTS fleet.file_open
(
    `time` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `node` LowCardinality(String),
    `pid` UInt32 CODEC(T64, ZSTD(1)),
    `tid` UInt32 CODEC(T64, ZSTD(1)),
    `uid` UInt32 CODEC(T64, ZSTD(1)),
    `cgroup_id` UInt64 CODEC(T64, ZSTD(1)),
    `comm` LowCardinality(String),
    `syscall` LowCardinality(String),
    `path` String CODEC(ZSTD(3)),
    `flags` UInt32 CODEC(T64, ZSTD(1)),
    `mode` UInt32 CODEC(T64, ZSTD(1)),
    `fd` Int32 CODEC(T64, ZSTD(1)),
    `errno` UInt16 CODEC(T64, ZSTD(1)),
    `dfd` Int32 CODEC(T64, ZSTD(1)),
    `path_truncated` UInt8
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (node, time)
TTL toDateTime(time) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
