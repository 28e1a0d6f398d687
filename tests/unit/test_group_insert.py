"""Batches stored together in one insert are each stored exactly once, however a redelivery
regroups them (the real engine, in a child process: the embedded engine belongs to one
process and one data directory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
from fleetscope.store import connect, migrate
from fleetscope.codec import SCHEMAS, StringColumn, encode_batch
from fleetscope.v1 import batch_pb2
from ingester.load import BatchLoader

client = connect("chdb://" + sys.argv[1])
migrate(client)
loader = BatchLoader(client)
now = time.time_ns()

def batch(seq, rows=4, node="n1"):
    h = batch_pb2.BatchHeader(batch_id=f"{node}-process_exit-1-{seq}", stream="process_exit", epoch=1, sequence=seq,
                              row_count=rows)
    h.node.host_name = node
    cols = {"time": np.full(rows, now, np.uint64) + np.arange(rows, dtype=np.uint64),
            "pid": np.arange(rows, dtype=np.uint32) + 100 * seq, "ppid": np.ones(rows, np.uint32),
            "cgroup_id": np.zeros(rows, np.uint64), "comm": np.array([b"sh"] * rows, "S16"),
            "exit_code": np.zeros(rows, np.int32), "signal": np.zeros(rows, np.uint32),
            "duration_ns": np.ones(rows, np.uint64)}
    return loader.decode("process_exit", encode_batch(SCHEMAS["process_exit"], h, cols)), None

def parts():
    return client.command("SELECT count() FROM system.parts WHERE database = 'fleet' AND table = 'process_exit' "
                          "AND active")

out = {}
p0 = parts()
first = loader.insert_group("process_exit", [batch(1), batch(2), batch(3)])
out["first"] = [(r.rows_written, r.duplicate) for r in first]
out["parts_per_insert"] = parts() - p0
# redelivered after a crash, regrouped with new batches, one of them twice (the agent's spool sent it again)
again = loader.insert_group("process_exit", [batch(2), batch(3), batch(4), batch(4), batch(1, node="n2")])
out["again"] = [(r.rows_written, r.duplicate) for r in again]
# a batch cut short in storage (its insert split between partitions' parts, the process killed between them)
def cut(v):
    return v[:2] if isinstance(v, np.ndarray) else StringColumn(v.data, v.offsets, v.index[:2])
loader._insert("process_exit", {k: cut(v) for k, v in loader._values("process_exit", *batch(6)).items()}, 2, {})
replaced = loader.insert_group("process_exit", [batch(6), batch(7)])
out["replaced"] = [(r.rows_written, r.duplicate) for r in replaced]
out["rows"] = client.query("SELECT node, batch_sequence, count(), uniqExact(pid) FROM fleet.process_exit "
                           "GROUP BY node, batch_sequence ORDER BY node, batch_sequence").result_rows
out["loss"] = client.query("SELECT node, stored, sequence_gaps, duplicates FROM fleet.pipeline_loss "
                           "ORDER BY node").result_rows
print(json.dumps(out))
"""


def test_a_regrouped_redelivery_stores_every_batch_once_in_one_part_per_insert(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["first"] == [[4, False]] * 3
    assert result["parts_per_insert"] == 1  # three batches, one part
    # 2 and 3 were stored: left out; 4 twice in the group: once
    assert result["again"] == [[0, True], [0, True], [4, False], [0, True], [4, False]]
    assert result["replaced"] == [[4, False], [4, False]]  # the partial copy replaced by the whole batch
    assert result["rows"] == [["n1", seq, 4, 4] for seq in (1, 2, 3, 4, 6, 7)] + [["n2", 1, 4, 4]]
    assert result["loss"] == [["n1", 24, 1, 0], ["n2", 4, 0, 0]]  # n1's batch 5 never came
