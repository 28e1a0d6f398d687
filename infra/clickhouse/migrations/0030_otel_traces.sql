-- Spans in the OpenTelemetry Collector ClickHouse exporter's otel_traces layout (same
-- column names, types and meaning), so Grafana's ClickHouse data source shows them as
-- traces with its OTel defaults and no custom query. Written by the ingester: spans
-- derived from kernel events (TCP connections, process lifetimes, OOM kills, fatal
-- signals), deduplicated with the token "<batch id>:spans". SpanKind and StatusCode use
-- the exporter's spelling ('Client', 'Server', 'Internal'; 'Unset', 'Error').
CREATE TABLE IF NOT EXISTS fleet.otel_traces
(
    `Timestamp` DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    `TraceId` String CODEC(ZSTD(1)),
    `SpanId` String CODEC(ZSTD(1)),
    `ParentSpanId` String CODEC(ZSTD(1)),
    `TraceState` String CODEC(ZSTD(1)),
    `SpanName` LowCardinality(String) CODEC(ZSTD(1)),
    `SpanKind` LowCardinality(String) CODEC(ZSTD(1)),
    `ServiceName` LowCardinality(String) CODEC(ZSTD(1)),
    `ResourceAttributes` Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    `ScopeName` String CODEC(ZSTD(1)),
    `ScopeVersion` String CODEC(ZSTD(1)),
    `SpanAttributes` Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    `Duration` UInt64 CODEC(T64, ZSTD(1)),
    `StatusCode` LowCardinality(String) CODEC(ZSTD(1)),
    `StatusMessage` String CODEC(ZSTD(1)),
    `Events` Nested
    (
        `Timestamp` DateTime64(9),
        `Name` LowCardinality(String),
        `Attributes` Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    `Links` Nested
    (
        `TraceId` String,
        `SpanId` String,
        `TraceState` String,
        `Attributes` Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    `ResourceAttributeItems` Array(String) ALIAS arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(ResourceAttributes, 'Array(Tuple(String, String))')),
    `SpanAttributeItems` Array(String) ALIAS arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(SpanAttributes, 'Array(Tuple(String, String))')),
    INDEX `idx_trace_id` `TraceId` TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX `idx_res_attr_key` mapKeys(`ResourceAttributes`) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX `idx_res_attr_value` mapValues(`ResourceAttributes`) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX `idx_span_attr_key` mapKeys(`SpanAttributes`) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX `idx_span_attr_value` mapValues(`SpanAttributes`) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX `idx_duration` `Duration` TYPE minmax GRANULARITY 1,
    INDEX `idx_lower_span_name` lower(`SpanName`) TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 8
)
ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
PRIMARY KEY (ServiceName, SpanName, toDateTime(Timestamp))
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), Timestamp)
TTL toDateTime(Timestamp) + INTERVAL 30 DAY
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000
