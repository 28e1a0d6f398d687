-- One row per TCP connection end, IPv4 and IPv6 (probe "tcp_connections"): a connect()
-- (role 'connect', failed attempts included) or a connection accepted from a listener
-- (role 'accept'). Both ends on one node are two rows with local/remote swapped.
-- Addresses are IPv6; IPv4 is stored v4-mapped (::ffff:a.b.c.d): filter with
-- `remote_addr = toIPv6('10.0.0.7')`, show with `IPv6NumToString(remote_addr)` or, for
-- family 4, `toIPv4(remote_addr)`.
CREATE TABLE IF NOT EXISTS fleet.tcp_connections
(
    `time` DateTime64(9, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `node` LowCardinality(String),
    `duration_ns` UInt64 CODEC(T64, ZSTD(1)),
    `handshake_ns` UInt64 CODEC(T64, ZSTD(1)),
    `pid` UInt32 CODEC(T64, ZSTD(1)),
    `comm` LowCardinality(String),
    `cgroup_id` UInt64 CODEC(T64, ZSTD(1)),
    `owner_known` UInt8,
    `role` LowCardinality(String),
    `family` UInt8,
    `local_addr` IPv6 CODEC(ZSTD(1)),
    `local_port` UInt16 CODEC(T64, ZSTD(1)),
    `remote_addr` IPv6 CODEC(ZSTD(1)),
    `remote_port` UInt16 CODEC(T64, ZSTD(1)),
    `netns` UInt32 CODEC(T64, ZSTD(1)),
    `bytes_sent` UInt64 CODEC(T64, ZSTD(1)),
    `bytes_received` UInt64 CODEC(T64, ZSTD(1)),
    `srtt_us` UInt32 CODEC(T64, ZSTD(1)),
    `retransmits` UInt32 CODEC(T64, ZSTD(1)),
    `reset` LowCardinality(String),
    `failed` UInt8,
    `error` LowCardinality(String),
    INDEX `idx_remote_addr` `remote_addr` TYPE bloom_filter GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (node, time)
TTL toDateTime(time) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
