-- Run queue wait histograms (probe "runqueue_latency", sched_wakeup/sched_wakeup_new or
-- preemption to sched_switch), aggregated in the kernel: one row per node, interval and
-- cgroup of the waiting task. buckets[i] (i = 1..32 in SQL) counts waits in
-- [2^(i-1), 2^i) ns, buckets[32] from 2^31 ns up. count = arraySum(buckets).
CREATE TABLE IF NOT EXISTS fleet.runqueue_latency
(
    `time` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `interval_s` Float64 CODEC(ZSTD(1)),
    `node` LowCardinality(String),
    `cgroup_id` UInt64 CODEC(T64, ZSTD(1)),
    `count` UInt64 CODEC(T64, ZSTD(1)),
    `sum_ns` UInt64 CODEC(T64, ZSTD(1)),
    `buckets` Array(UInt64) CODEC(ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (node, cgroup_id, time)
TTL toDateTime(time) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
