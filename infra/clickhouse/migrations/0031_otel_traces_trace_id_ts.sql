-- First and last span time per trace id, as the OTel ClickHouse exporter keeps it: Grafana's
-- ClickHouse data source narrows a trace-id lookup in otel_traces to this time range.
-- Filled by otel_traces_trace_id_ts_mv.
CREATE TABLE IF NOT EXISTS fleet.otel_traces_trace_id_ts
(
    `TraceId` String CODEC(ZSTD(1)),
    `Start` SimpleAggregateFunction(min, DateTime) CODEC(ZSTD(1)),
    `End` SimpleAggregateFunction(max, DateTime) CODEC(ZSTD(1))
)
ENGINE = AggregatingMergeTree
PARTITION BY toStartOfWeek(Start)
ORDER BY TraceId
TTL Start + INTERVAL 30 DAY
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
