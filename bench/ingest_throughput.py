"""Ingester throughput: decoded batches -> ClickHouse through clickhouse-connect, per core.

Builds process_exec-shaped batches the way the agent does (Batcher + fast codec), then
measures, in one run against the same embedded ClickHouse engine (chdb):

- columnar: fleetscope's path, decode (numpy.frombuffer) + column-wise insert with the
  batch id as deduplication token (ingester.load.BatchLoader);
- row-by-row baseline: the same rows decoded into Python tuples and inserted row-oriented,
  the way a naive consumer would.

Rows/s per core = rows / CPU seconds of this process (chdb's insert threads included).

Usage: .venv/bin/python bench/ingest_throughput.py [--rows 1000000] [--out bench/results/ingest_throughput.txt]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleetscope.store import connect, migrate  # noqa: E402
from ingester.load import BatchLoader  # noqa: E402
from node_agent.batcher import Batcher, node_identity  # noqa: E402
from node_agent.probes.process import exec_columns  # noqa: E402

EXEC_DTYPE = np.dtype(
    [("time_ns", "<u8"), ("cgroup_id", "<u8"), ("pid", "<u4"), ("ppid", "<u4"), ("uid", "<u4"),
     ("args_len", "<u4"), ("argc", "<u4"), ("flags", "<u4"), ("comm", "S16"), ("filename", "S256"),
     ("args", "S1024")]
)  # fmt: skip


def records(n: int, rng: np.random.Generator) -> np.ndarray:
    """Realistic exec records: few distinct binaries, mostly distinct argument lists."""
    rec = np.zeros(n, EXEC_DTYPE)
    rec["time_ns"] = time.clock_gettime_ns(time.CLOCK_BOOTTIME) + np.arange(n, dtype=np.uint64) * 1000
    rec["cgroup_id"] = rng.integers(1, 200, n)
    rec["pid"] = np.arange(n) + 1000
    rec["ppid"] = rng.integers(1, 5000, n)
    binaries = [f"/usr/bin/tool{i}" for i in range(60)]
    pick = rng.integers(0, len(binaries), n)
    rec["filename"] = np.array([b.encode() for b in binaries])[pick]
    rec["comm"] = np.array([f"tool{i}".encode() for i in range(60)])[pick]
    args = np.char.add(np.array([b.encode() for b in binaries])[pick], b"\0--id\0")
    args = np.char.add(args, rng.integers(0, 10**9, n).astype("S10"))
    rec["args"] = args
    rec["args_len"] = np.char.str_len(args) + 1
    rec["argc"] = 3
    return rec


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-rows", type=int, default=16384)
    ap.add_argument("--baseline-rows", type=int, default=100_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingest_throughput.txt"))
    a = ap.parse_args()
    rng = np.random.default_rng(1)
    batcher = Batcher(
        node_identity("bench-node"), {"process_exec": exec_columns}, a.batch_rows, 1 << 40, 3600.0
    )
    recs = records(a.rows, rng)
    batches = [
        b
        for i in range(0, a.rows, a.batch_rows)
        for b in batcher.add("process_exec", recs[i : i + a.batch_rows])
    ]
    batches += batcher.flush()
    wire_bytes = sum(len(b.payload) for b in batches)
    store = tempfile.mkdtemp(prefix="fsbench-ingest-")
    client = connect(f"chdb://{store}")
    migrate(client)
    loader = BatchLoader(client)
    loader.insert(loader.decode("process_exec", batches[0].payload))  # warm up: table types, engine
    client.command("TRUNCATE TABLE fleet.process_exec")

    wall0, cpu0 = time.perf_counter(), cpu()
    for b in batches:
        loader.insert(loader.decode("process_exec", b.payload))
    col_wall, col_cpu = time.perf_counter() - wall0, cpu() - cpu0
    stored = client.query("SELECT count() FROM fleet.process_exec").result_rows[0][0]
    assert stored == a.rows, stored

    # baseline: decode into Python row tuples, insert row-oriented
    client.command("CREATE TABLE fleet.process_exec_rows AS fleet.process_exec")
    base_batches = batches[: max(1, a.baseline_rows // a.batch_rows)]
    names = [
        "time",
        "node",
        "pid",
        "ppid",
        "uid",
        "cgroup_id",
        "comm",
        "filename",
        "args",
        "argc",
        "args_truncated",
    ]
    wall0, cpu0 = time.perf_counter(), cpu()
    base_rows = 0
    for b in base_batches:
        d = loader.decode("process_exec", b.payload)
        c = d.columns
        comm, filename, args = (c[k].decoded() for k in ("comm", "filename", "args"))
        rows = [
            (int(c["time"][i]), d.header.node.host_name, int(c["pid"][i]), int(c["ppid"][i]), int(c["uid"][i]),
             int(c["cgroup_id"][i]), comm[i], filename[i], args[i], int(c["argc"][i]), int(c["args_truncated"][i]))
            for i in range(d.rows)
        ]  # fmt: skip
        client.insert("fleet.process_exec_rows", rows, column_names=names)
        base_rows += len(rows)
    base_wall, base_cpu = time.perf_counter() - wall0, cpu() - cpu0

    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus: {os.cpu_count()}  engine: chdb (embedded ClickHouse)",
        f"batches: {len(batches)} x {a.batch_rows} rows of process_exec, {wire_bytes / a.rows:.0f} wire bytes/row",
        f"columnar (fleetscope): {a.rows} rows, wall {col_wall:.2f}s, cpu {col_cpu:.2f}s "
        f"-> {a.rows / col_cpu:,.0f} rows/s per core ({a.rows / col_wall:,.0f} rows/s wall)",
        f"row-by-row baseline: {base_rows} rows, wall {base_wall:.2f}s, cpu {base_cpu:.2f}s "
        f"-> {base_rows / base_cpu:,.0f} rows/s per core",
        f"ratio columnar/baseline per core: {(a.rows / col_cpu) / (base_rows / base_cpu):.1f}x",
    ]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
