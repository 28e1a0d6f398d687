"""The migrations give every MergeTree table insert deduplication, and a batch inserted twice
with its batch id as token is stored once (the real engine, in a child process: the embedded
engine belongs to one process and one data directory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetscope.errors import MigrationError
from fleetscope.store import load_migrations

CHILD = r"""
import json, sys, time
import numpy as np
from fleetscope.store import connect, migrate
from fleetscope.codec import SCHEMAS, encode_batch
from fleetscope.v1 import batch_pb2
from ingester.load import BatchLoader

client = connect("chdb://" + sys.argv[1])
migrate(client)
tables = client.query(
    "SELECT name, engine, create_table_query FROM system.tables WHERE database = 'fleet' "
    "AND engine LIKE '%MergeTree'"
).result_rows
h = batch_pb2.BatchHeader(batch_id="m-process_exit-1-1", stream="process_exit", epoch=1, sequence=1, row_count=3)
h.node.host_name = "dedup"
now = np.full(3, time.time_ns(), np.uint64)  # within the tables' TTL
cols = {"time": now, "pid": np.arange(3, dtype=np.uint32), "ppid": np.ones(3, np.uint32),
        "cgroup_id": np.zeros(3, np.uint64), "comm": np.array([b"sh"] * 3, "S16"),
        "exit_code": np.zeros(3, np.int32), "signal": np.zeros(3, np.uint32), "duration_ns": np.ones(3, np.uint64)}
loader = BatchLoader(client)
batch = loader.decode("process_exit", encode_batch(SCHEMAS["process_exit"], h, cols))
for _ in range(3):
    loader.insert(batch)
rows = client.command("SELECT count() FROM fleet.process_exit WHERE node = 'dedup'")
# the view reads the tables' per-batch projections, not their rows (it fails otherwise)
records = client.command(
    "SELECT count() FROM fleet.batches WHERE node = 'dedup' SETTINGS force_optimize_projection = 1")
# the same batch under another token (a redelivery regrouped with others): found, left out
h.batch_id = "m-process_exit-1-1-again"
again = loader.insert(loader.decode("process_exit", encode_batch(SCHEMAS["process_exit"], h, cols)))
# a copy written past that check (a member that lost its partitions racing their new owner)
racing = loader._values("process_exit", batch, None)
loader._insert("process_exit", racing, 3, {"insert_deduplication_token": "racing"})
loss = client.query(
    "SELECT stored, sequence_gaps, duplicates FROM fleet.pipeline_loss WHERE node = 'dedup'").result_rows
print(json.dumps({"tables": tables, "rows": int(rows), "records": int(records), "again": again.duplicate,
                  "loss": loss}))
"""


def test_every_mergetree_table_deduplicates_and_a_batch_is_stored_once(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    tables = {name: (engine, sql) for name, engine, sql in result["tables"]}
    assert {"process_exec", "batches_v0", "pipeline_stats", "otel_traces", "otel_traces_trace_id_ts"} <= set(tables)
    # schema_migrations (store.migrate's own ReplacingMergeTree) collapses repeats by version instead
    missing = [n for n, (_, sql) in tables.items()
               if "non_replicated_deduplication_window = 10000" not in sql and n != "schema_migrations"]  # fmt: skip
    assert not missing, f"tables without insert deduplication: {missing}"
    # the repeats were deduplicated on the batch id (the engine's summary still says 3 rows
    # written for them, so the fleet.batches view, not written_rows, tells duplicates apart)
    assert (result["rows"], result["records"]) == (3, 1)
    assert result["again"]
    # stored twice: its rows count once in `stored`, the second copy as a duplicate
    assert result["loss"] == [[3, 0, 1]]


def test_rebuild_migrations_are_parsed_and_checked(tmp_path: Path) -> None:
    good = "# why\ntable: process_exec\norder_by: [k8s_namespace, k8s_workload, node, time]\n"
    (tmp_path / "0001_a.sql").write_text("SELECT 1")
    (tmp_path / "0002_a_key.rebuild.yaml").write_text(good)
    migs = load_migrations(tmp_path)
    assert [(m.version, m.name) for m in migs] == [(1, "a"), (2, "a_key")]
    assert migs[1].rebuild is not None and migs[1].rebuild.sorting_key == "k8s_namespace, k8s_workload, node, time"
    assert migs[1].checksum != migs[0].checksum
    for bad in ("table: t\n", "table: t\norder_by: []\n", "table: t\norder_by: [a]\nengine: x\n",
                "table: t; DROP\norder_by: [a]\n", "order_by: [toDate(time)]\ntable: t\n", "table: [\n",
                "table: t\norder_by: [a]\nindexes: {i: a}\n",
                "table: t\norder_by: [a]\nindexes: [a TYPE set]\n"):  # fmt: skip
        (tmp_path / "0002_a_key.rebuild.yaml").write_text(bad)
        with pytest.raises(MigrationError, match=r"0002_a_key\.rebuild\.yaml"):
            load_migrations(tmp_path)
    (tmp_path / "0002_a_key.rebuild.yaml").write_text(good)
    (tmp_path / "0002_b.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="share a number"):
        load_migrations(tmp_path)
