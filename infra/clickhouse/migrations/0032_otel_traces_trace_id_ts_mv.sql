-- Keeps otel_traces_trace_id_ts up to date with every insert into otel_traces.
CREATE MATERIALIZED VIEW IF NOT EXISTS fleet.otel_traces_trace_id_ts_mv
TO fleet.otel_traces_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM fleet.otel_traces
WHERE TraceId != ''
GROUP BY TraceId
