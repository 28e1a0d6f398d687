-- fleet.batches becomes a view over the rows' batch identity (0081); the records written
-- before (one insert of their own per batch) stay queryable here and in that view.
RENAME TABLE IF EXISTS fleet.batches TO fleet.batches_v0
