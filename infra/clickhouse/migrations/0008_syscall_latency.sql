-- Syscall latency histograms (probe "syscall_latency", raw_syscalls:sys_enter/sys_exit),
-- aggregated in the kernel: one row per node, interval, cgroup and syscall.
-- buckets[i] (i = 1..32 in SQL) counts latencies in [2^(i-1), 2^i) ns; buckets[1] also
-- holds 0 ns and buckets[32] everything from 2^31 ns (2.1 s) up. count = arraySum(buckets).
-- Percentiles per workload: README.md, "Latency histograms".
CREATE TABLE IF NOT EXISTS fleet.syscall_latency
(
    `time` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `interval_s` Float64 CODEC(ZSTD(1)),
    `node` LowCardinality(String),
    `cgroup_id` UInt64 CODEC(T64, ZSTD(1)),
    `syscall_nr` UInt32 CODEC(T64, ZSTD(1)),
    `syscall` LowCardinality(String),
    `count` UInt64 CODEC(T64, ZSTD(1)),
    `sum_ns` UInt64 CODEC(T64, ZSTD(1)),
    `buckets` Array(UInt64) CODEC(ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (node, cgroup_id, syscall, time)
TTL toDateTime(time) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
