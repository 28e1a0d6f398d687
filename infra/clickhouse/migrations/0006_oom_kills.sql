-- One row per OOM killer victim (probe "oom_kills", tracepoint oom:mark_victim), with the
-- victim's memory figures in KiB as the kernel logs them, and the task whose allocation
-- triggered the kill. cgroup_id is the victim's cgroup v2 id, 0 when unknown.
CREATE TABLE IF NOT EXISTS fleet.oom_kills
(
    `time` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `node` LowCardinality(String),
    `pid` UInt32 CODEC(T64, ZSTD(1)),
    `uid` UInt32 CODEC(T64, ZSTD(1)),
    `cgroup_id` UInt64 CODEC(T64, ZSTD(1)),
    `comm` LowCardinality(String),
    `total_vm_kb` UInt64 CODEC(T64, ZSTD(1)),
    `anon_rss_kb` UInt64 CODEC(T64, ZSTD(1)),
    `file_rss_kb` UInt64 CODEC(T64, ZSTD(1)),
    `shmem_rss_kb` UInt64 CODEC(T64, ZSTD(1)),
    `pgtables_kb` UInt64 CODEC(T64, ZSTD(1)),
    `oom_score_adj` Int16,
    `trigger_pid` UInt32 CODEC(T64, ZSTD(1)),
    `trigger_comm` LowCardinality(String),
    `trigger_cgroup_id` UInt64 CODEC(T64, ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (node, time)
TTL toDateTime(time) + INTERVAL 90 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
