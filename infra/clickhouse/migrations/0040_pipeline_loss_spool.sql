-- Where events went (replaces 0012's view; same columns, two more at the end): as 0012,
-- plus the rows the agent's disk spool lost, a part of agent_dropped:
--   spool_evicted: in segments evicted because the spool was full (spool_max_bytes),
--   spool_corrupt: in records found damaged on disk (quarantined at the agent's start).
-- Counters of no stream (stream '', e.g. spool_bytes_unreadable) stay out of the view.
-- With nothing lost:
--   kernel_emitted = kernel_dropped + agent_dropped + stored (once the agent flushed).
CREATE OR REPLACE VIEW fleet.pipeline_loss AS
SELECT
    node,
    stream,
    hour,
    sum(kernel_emitted) AS kernel_emitted,
    sum(kernel_dropped) AS kernel_dropped,
    sum(agent_read) AS agent_read,
    sum(shipped) AS shipped,
    sum(agent_dropped) AS agent_dropped,
    sum(dead_lettered) AS dead_lettered,
    sum(stored) AS stored,
    sum(sequence_gaps) AS sequence_gaps,
    sum(duplicates) AS duplicates,
    sum(spool_evicted) AS spool_evicted,
    sum(spool_corrupt) AS spool_corrupt
FROM
(
    SELECT
        node,
        stream,
        toStartOfHour(time) AS hour,
        sumIf(value, stage = 'kernel' AND counter = 'emitted') AS kernel_emitted,
        sumIf(value, stage = 'kernel' AND counter = 'dropped') AS kernel_dropped,
        sumIf(value, stage = 'agent' AND counter = 'records_read') AS agent_read,
        sumIf(value, stage = 'agent' AND counter = 'rows_shipped') AS shipped,
        sumIf(value, stage = 'agent' AND counter = 'rows_dropped') AS agent_dropped,
        sumIf(value, stage = 'ingester' AND counter = 'batches_dead_lettered') AS dead_lettered,
        toUInt64(0) AS stored,
        toUInt64(0) AS sequence_gaps,
        toUInt64(0) AS duplicates,
        sumIf(value, stage = 'agent' AND counter = 'rows_spool_evicted') AS spool_evicted,
        sumIf(value, stage = 'agent' AND counter = 'rows_spool_corrupt') AS spool_corrupt
    FROM fleet.pipeline_stats
    WHERE stream != ''
    GROUP BY node, stream, hour
    UNION ALL
    SELECT
        node,
        stream,
        toStartOfHour(created) AS hour,
        toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0),
        toUInt64(sum(rows)) AS stored,
        toUInt64(sum(gap)) AS sequence_gaps,
        toUInt64(sum(copies) - count()) AS duplicates,
        toUInt64(0), toUInt64(0)
    FROM
    (
        -- one row per batch; copies > 1 means the same batch was stored more than once
        SELECT
            node,
            stream,
            epoch,
            sequence,
            min(created) AS created,
            any(rows) AS rows,
            count() AS copies,
            -- sequences run 1, 2, 3... per (node, stream, epoch): a jump is missing batches
            toUInt64(greatest(toInt64(sequence) - toInt64(lagInFrame(sequence, 1, 0) OVER (
                PARTITION BY node, stream, epoch ORDER BY sequence
                ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) - 1, 0)) AS gap
        FROM fleet.batches
        GROUP BY node, stream, epoch, sequence
    )
    GROUP BY node, stream, hour
)
GROUP BY node, stream, hour
