-- Which agent batch each row came from (node, stream and these three identify it), so the
-- rows themselves are the record of stored batches (view fleet.batches, 0081) and a batch
-- costs ClickHouse one insert, deduplicated on the batch id. Constant within a batch. The
-- projection keeps one row per batch and part, so that view reads no more than the old table.
ALTER TABLE fleet.block_io_latency
    ADD COLUMN IF NOT EXISTS `batch_epoch` UInt64,
    ADD COLUMN IF NOT EXISTS `batch_sequence` UInt64,
    ADD COLUMN IF NOT EXISTS `batch_rows` UInt32,
    ADD PROJECTION IF NOT EXISTS `batches` (
        SELECT node, batch_epoch, batch_sequence, batch_rows, min(time), count()
        GROUP BY node, batch_epoch, batch_sequence, batch_rows
    )
