-- Where events went, per node, event kind and hour: emitted and dropped in the kernel,
-- read, shipped and dropped by the agent, stored in ClickHouse, and the sequence gaps and
-- duplicate batches seen in fleet.batches. With nothing lost:
--   kernel_emitted = kernel_dropped + agent_dropped + stored (once the agent flushed).
CREATE VIEW IF NOT EXISTS fleet.pipeline_loss AS
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
    sum(duplicates) AS duplicates
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
        toUInt64(0) AS duplicates
    FROM fleet.pipeline_stats
    GROUP BY node, stream, hour
    UNION ALL
    SELECT
        node,
        stream,
        toStartOfHour(created) AS hour,
        toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0),
        toUInt64(sum(rows)) AS stored,
        toUInt64(sum(gap)) AS sequence_gaps,
        toUInt64(sum(copies) - count()) AS duplicates
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
