-- One row per stored copy of an agent batch, from the rows themselves (batch_epoch,
-- batch_sequence, batch_rows: 0070-0079) plus the records of fleet.batches_v0 from before.
-- Same columns as that table had, less machine_id, batch_id and inserted_at; `created` is
-- the batch's earliest row time. A batch stored twice (its insert not deduplicated) has
-- twice its rows: two rows here, as before. Rows of no batch (the ingester's own counters
-- in pipeline_stats) have batch_rows = 0.
CREATE OR REPLACE VIEW fleet.batches AS
SELECT node, stream, epoch, sequence, created, rows
FROM
(
    SELECT node, 'process_exec' AS stream, batch_epoch AS epoch, batch_sequence AS sequence, min(time) AS created,
           batch_rows AS rows, toUInt64(ceil(count() / batch_rows)) AS copies
    FROM fleet.process_exec WHERE batch_rows > 0 GROUP BY node, batch_epoch, batch_sequence, batch_rows
    UNION ALL
    SELECT node, 'process_exit' AS stream, batch_epoch AS epoch, batch_sequence AS sequence, min(time) AS created,
           batch_rows AS rows, toUInt64(ceil(count() / batch_rows)) AS copies
    FROM fleet.process_exit WHERE batch_rows > 0 GROUP BY node, batch_epoch, batch_sequence, batch_rows
    UNION ALL
    SELECT node, 'tcp_connections' AS stream, batch_epoch AS epoch, batch_sequence AS sequence, min(time) AS created,
           batch_rows AS rows, toUInt64(ceil(count() / batch_rows)) AS copies
    FROM fleet.tcp_connections WHERE batch_rows > 0 GROUP BY node, batch_epoch, batch_sequence, batch_rows
    UNION ALL
    SELECT node, 'file_open' AS stream, batch_epoch AS epoch, batch_sequence AS sequence, min(time) AS created,
           batch_rows AS rows, toUInt64(ceil(count() / batch_rows)) AS copies
    FROM fleet.file_open WHERE batch_rows > 0 GROUP BY node, batch_epoch, batch_sequence, batch_rows
    UNION ALL
    SELECT node, 'oom_kills' AS stream, batch_epoch AS epoch, batch_sequence AS sequence, min(time) AS created,
           batch_rows AS rows, toUInt64(ceil(count() / batch_rows)) AS copies
    FROM fleet.oom_kills WHERE batch_rows > 0 GROUP BY node, batch_epoch, batch_sequence, batch_rows
    UNION ALL
    SELECT node, 'fatal_signals' AS stream, batch_epoch AS epoch, batch_sequence AS sequence, min(time) AS created,
           batch_rows AS rows, toUInt64(ceil(count() / batch_rows)) AS copies
    FROM fleet.fatal_signals WHERE batch_rows > 0 GROUP BY node, batch_epoch, batch_sequence, batch_rows
    UNION ALL
    SELECT node, 'syscall_latency' AS stream, batch_epoch AS epoch, batch_sequence AS sequence, min(time) AS created,
           batch_rows AS rows, toUInt64(ceil(count() / batch_rows)) AS copies
    FROM fleet.syscall_latency WHERE batch_rows > 0 GROUP BY node, batch_epoch, batch_sequence, batch_rows
    UNION ALL
    SELECT node, 'block_io_latency' AS stream, batch_epoch AS epoch, batch_sequence AS sequence, min(time) AS created,
           batch_rows AS rows, toUInt64(ceil(count() / batch_rows)) AS copies
    FROM fleet.block_io_latency WHERE batch_rows > 0 GROUP BY node, batch_epoch, batch_sequence, batch_rows
    UNION ALL
    SELECT node, 'runqueue_latency' AS stream, batch_epoch AS epoch, batch_sequence AS sequence, min(time) AS created,
           batch_rows AS rows, toUInt64(ceil(count() / batch_rows)) AS copies
    FROM fleet.runqueue_latency WHERE batch_rows > 0 GROUP BY node, batch_epoch, batch_sequence, batch_rows
    UNION ALL
    SELECT node, 'pipeline_stats' AS stream, batch_epoch AS epoch, batch_sequence AS sequence, min(time) AS created,
           batch_rows AS rows, toUInt64(ceil(count() / batch_rows)) AS copies
    FROM fleet.pipeline_stats WHERE batch_rows > 0 GROUP BY node, batch_epoch, batch_sequence, batch_rows
    UNION ALL
    SELECT node, stream, epoch, sequence, created, rows, toUInt64(1) AS copies FROM fleet.batches_v0
)
ARRAY JOIN range(copies) AS copy
