"""Ingester throughput: decoded batches -> ClickHouse through clickhouse-connect, per core.

Builds process_exec-shaped batches the way the agent does (Batcher + fast codec), then
measures, in one run against the same embedded ClickHouse engine (chdb):

- columnar: fleetscope's path, decode (numpy.frombuffer) + Native block + one raw_insert
  with the batch id as deduplication token (ingester.load.BatchLoader.insert; the rows carry
  the batch identity that the fleet.batches view reads), for several batch sizes: "agent" is what the agent
  cuts with its defaults (batch_max_rows 16384, batch_max_bytes 1 MiB: the byte bound,
  learned from the encoded size, ends a process_exec batch at ~8.5k rows), the others are
  fixed row counts; "agent:group" is what `fleetscope ingest` does with them: the fetched
  batches of a stream in one insert of up to insert_max_bytes (16 MiB) of messages, after
  asking the table which are stored already; "agent:lc" is an experiment: the same batches with the String column
  (args) sent in the Native block as LowCardinality(String), which the engine converts;
- row-by-row baseline: the same rows decoded into Python tuples and inserted row-oriented
  through clickhouse-connect, the way a naive consumer would.

Rows/s per core = rows / CPU seconds of this process: the engine runs in-process, so its
insert, compression and background merge threads are included. Each measurement runs
--repeat times (interleaved, fresh batch ids each time); the report gives the median and
each value, and for the agent-sized batches where the CPU goes: decode, building the Native
block, the insert, and the rest (Python around them, background merges between inserts).

Usage: .venv/bin/python bench/ingest_throughput.py [--rows 600000] [--sizes agent,4096,16384,65536]
       [--repeat 3] [--out bench/results/ingest_throughput.txt]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleetscope import native  # noqa: E402
from fleetscope.codec import StringColumn  # noqa: E402
from fleetscope.store import connect, migrate  # noqa: E402
from ingester.load import BatchLoader  # noqa: E402
from node_agent.batcher import Batch, Batcher, node_identity  # noqa: E402
from node_agent.probes.process import exec_columns  # noqa: E402

EXEC_DTYPE = np.dtype(
    [("time_ns", "<u8"), ("cgroup_id", "<u8"), ("pid", "<u4"), ("ppid", "<u4"), ("uid", "<u4"),
     ("args_len", "<u4"), ("argc", "<u4"), ("flags", "<u4"), ("comm", "S16"), ("filename", "S256"),
     ("args", "S1024")]
)  # fmt: skip
AGENT_MAX_ROWS, AGENT_MAX_BYTES = 16384, 1 << 20  # the agent's defaults (fleetscope.config)
INSERT_MAX_BYTES = 16 << 20  # the ingester's default insert_max_bytes
BASELINE_NAMES = [
    "time", "node", "pid", "ppid", "uid", "cgroup_id", "comm", "filename", "args", "argc", "args_truncated",
]  # fmt: skip


def records(n: int, rng: np.random.Generator, start: int = 0) -> np.ndarray:
    """Realistic exec records: few distinct binaries, mostly distinct argument lists."""
    rec = np.zeros(n, EXEC_DTYPE)
    rec["time_ns"] = time.clock_gettime_ns(time.CLOCK_BOOTTIME) + (start + np.arange(n, dtype=np.uint64)) * 1000
    rec["cgroup_id"] = rng.integers(1, 200, n)
    rec["pid"] = start + np.arange(n) + 1000
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


def make_batches(rows: int, size: str) -> list[Batch]:
    """rows of exec records cut into batches by a fresh Batcher (fresh epoch: new batch ids)."""
    size = size.split(":")[0]
    max_rows, max_bytes = (AGENT_MAX_ROWS, AGENT_MAX_BYTES) if size == "agent" else (int(size), 1 << 40)
    batcher = Batcher(node_identity("bench-node"), {"process_exec": exec_columns}, max_rows, max_bytes, 3600.0)
    rng = np.random.default_rng(1)
    out: list[Batch] = []
    for start in range(0, rows, 4096):  # ring-buffer drains come in chunks
        out += batcher.add("process_exec", records(min(4096, rows - start), rng, start))
    out += batcher.flush()
    if size == "agent":  # the first batch is cut pessimistically before the size is learned
        out = out[1:]
    return out


def cpu() -> float:
    """CPU seconds of this process, all threads (getrusage: scheduler time, not clock ticks)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class StringsAsLowCardinality:
    """While on, String columns go into the Native block typed LowCardinality(String): their
    dictionary as it is, and the engine expands it (input_format_native_allow_types_conversion,
    on by default) instead of numpy gathering every row's bytes. An experiment, not the product."""

    on = False

    @classmethod
    def install(cls) -> None:
        inner = native.block

        def block(columns: list[tuple[str, str, Any]], rows: int) -> bytes:
            if cls.on:
                columns = [
                    (n, "LowCardinality(String)" if t == "String" and isinstance(v, StringColumn) else t, v)
                    for n, t, v in columns
                ]
            return inner(columns, rows)

        native.block = block  # type: ignore[assignment]


class Stages:
    """CPU time per stage of BatchLoader.insert, by wrapping what it calls. Python stages
    (decode, Native block) count this thread's CPU; an insert counts the process's, as the
    engine works in its own threads too (background merges running meanwhile included)."""

    def __init__(self, loader: BatchLoader, client: Any) -> None:
        self.cpu: Counter[str] = Counter()
        self._active = False
        self._wrap(native, "block", lambda *a, **k: "native block", time.thread_time)
        self._wrap(client, "raw_insert", lambda table, *a, **k: f"insert {str(table).split('.')[-1].strip('`')}", cpu)
        self._wrap(loader, "decode", lambda *a, **k: "decode", time.thread_time)

    def _wrap(self, obj: Any, name: str, key: Callable[..., str], clock: Callable[[], float]) -> None:
        inner = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self._active:
                return inner(*args, **kwargs)
            c0 = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                self.cpu[key(*args, **kwargs)] += clock() - c0

        setattr(obj, name, timed)

    def __enter__(self) -> Stages:
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False


def groups(batches: list[Batch], grouped: bool) -> list[list[Batch]]:
    """Batches as the ingester inserts them: alone, or together up to insert_max_bytes."""
    if not grouped:
        return [[b] for b in batches]
    out: list[list[Batch]] = [[]]
    for b in batches:
        if out[-1] and sum(len(x.payload) for x in out[-1]) + len(b.payload) > INSERT_MAX_BYTES:
            out.append([])
        out[-1].append(b)
    return out


def columnar(client: Any, loader: BatchLoader, batches: list[Batch], grouped: bool = False) -> tuple[float, float]:
    """(CPU s, wall s) to decode and insert these batches."""
    client.command("TRUNCATE TABLE fleet.process_exec")
    wall0, cpu0 = time.perf_counter(), cpu()
    for group in groups(batches, grouped):
        loader.insert_group("process_exec", [(loader.decode("process_exec", b.payload), None) for b in group])
    wall, used = time.perf_counter() - wall0, cpu() - cpu0
    stored = client.query("SELECT count() FROM fleet.process_exec").result_rows[0][0]
    assert stored == sum(b.rows for b in batches), stored
    return used, wall


def row_by_row(client: Any, loader: BatchLoader, batches: list[Batch]) -> tuple[int, float]:
    """Decode into Python row tuples, insert row-oriented; (rows, CPU s)."""
    cpu0, rows = cpu(), 0
    for b in batches:
        d = loader.decode("process_exec", b.payload)
        c = d.columns
        comm, filename, args = (c[k].decoded() for k in ("comm", "filename", "args"))
        data = [
            (int(c["time"][i]), d.header.node.host_name, int(c["pid"][i]), int(c["ppid"][i]), int(c["uid"][i]),
             int(c["cgroup_id"][i]), comm[i], filename[i], args[i], int(c["argc"][i]), int(c["args_truncated"][i]))
            for i in range(d.rows)
        ]  # fmt: skip
        client.insert("fleet.process_exec_rows", data, column_names=BASELINE_NAMES)
        rows += len(data)
    return rows, cpu() - cpu0


def each(values: list[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def lines_for(name: str, rates: list[float], walls: list[float], batches: list[Batch]) -> str:
    rows = sum(b.rows for b in batches)
    per_batch = rows / len(batches)
    return (
        f"{name:>11}: {per_batch:>7,.0f} rows/batch {sum(len(b.payload) for b in batches) / rows:4.0f} B/row"
        f" -> {statistics.median(rates):>9,.0f} rows/s per core [{each(rates, ',.0f')}]"
        f"  ({statistics.median(walls):,.0f} rows/s wall)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=600_000, help="rows per columnar measurement")
    ap.add_argument(
        "--sizes",
        default="agent:group,agent,agent:lc,4096,16384,65536",
        help="batch sizes: 'agent' or rows; ':group' inserts them as the ingester does (together up to "
        "insert_max_bytes); ':lc' sends String columns as LowCardinality (an experiment)",
    )
    ap.add_argument("--baseline-rows", type=int, default=60_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingest_throughput.txt"))
    a = ap.parse_args()
    sizes = a.sizes.split(",")
    store = tempfile.mkdtemp(prefix="fsbench-ingest-")
    client = connect(f"chdb://{store}")
    migrate(client)
    client.command("CREATE TABLE fleet.process_exec_rows AS fleet.process_exec")
    loader = BatchLoader(client)
    warm = make_batches(20_000, "4096")
    loader.insert(loader.decode("process_exec", warm[0].payload))  # table types, engine start-up
    StringsAsLowCardinality.install()
    stages = Stages(loader, client)

    rates: dict[str, list[float]] = {s: [] for s in sizes}
    walls: dict[str, list[float]] = {s: [] for s in sizes}
    shapes: dict[str, list[Batch]] = {}
    base_rates: list[float] = []
    breakdown: dict[str, list[tuple[float, Counter[str]]]] = {s: [] for s in sizes}
    for _ in range(a.repeat):
        for size in sizes:
            batches = make_batches(a.rows, size)
            shapes[size] = batches
            rows = sum(b.rows for b in batches)
            stages.cpu.clear()
            StringsAsLowCardinality.on = size.endswith(":lc")
            with stages:
                used, wall = columnar(client, loader, batches, grouped=size.endswith(":group"))
            rates[size].append(rows / used)
            walls[size].append(rows / wall)
            breakdown[size].append((used, Counter(stages.cpu)))
            StringsAsLowCardinality.on = False
        client.command("TRUNCATE TABLE fleet.process_exec_rows")
        base_batches = make_batches(a.baseline_rows, "agent")
        n, used = row_by_row(client, loader, base_batches)
        base_rates.append(n / used)

    first = sizes[0]
    ratios = [c / b for c, b in zip(rates[first], base_rates, strict=True)]
    out = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus: {os.cpu_count()}  engine: chdb (embedded ClickHouse)  "
        f"load before: {os.getloadavg()[0]:.2f}",
        f"process_exec rows, {a.rows:,} per measurement, {a.repeat} runs interleaved; median [each run]",
        "columnar (fleetscope: decode + Native block + raw_insert; one insert per batch, or per group with :group):",
        *(lines_for(s, rates[s], walls[s], shapes[s]) for s in sizes),
        f"row-by-row baseline ({a.baseline_rows:,} rows, agent-sized batches): "
        f"{statistics.median(base_rates):,.0f} rows/s per core [{each(base_rates, ',.0f')}]",
        f"ratio columnar ({first}) / baseline per core: {statistics.median(ratios):.1f}x [{each(ratios, '.1f')}]",
        f"target >= 500,000 rows/s per core (aim 1,000,000): {first} batches at "
        f"{statistics.median(rates[first]) / 500_000:.0%} of the target",
        "",
        "where the CPU goes: ms of CPU per batch (median of the runs) and share of the measurement's CPU",
        f"  {'size':>11} {'batch rows':>10} {'decode':>14} {'native block':>14} {'insert':>14} {'other':>6}",
    ]
    keys = ["decode", "native block", "insert process_exec"]
    for size in sizes:
        n_batches = len(shapes[size])
        cells = []
        for key in keys:
            ms = statistics.median([c[key] for _, c in breakdown[size]]) * 1e3 / n_batches
            share = statistics.median([c[key] / used for used, c in breakdown[size]])
            cells.append(f"{ms:7.2f} ({share:4.0%})")
        rest = statistics.median([(used - sum(c[k] for k in keys)) / used for used, c in breakdown[size]])
        rows_per = sum(b.rows for b in shapes[size]) / n_batches
        out.append(f"  {size:>11} {rows_per:>10,.0f} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} {rest:>6.0%}")
    loader.close()
    shutil.rmtree(store, ignore_errors=True)
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
