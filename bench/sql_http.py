"""The ClickHouse HTTP interface over the embedded engine: insert throughput beside the
in-process path, query latency under full-speed ingestion, and what a slow SELECT does to
the in-process ingester of `fleetscope run`.

1. insert: 100k-row process_exit batches (columnar numpy, deduplication token per batch,
   as the ingester's loader does) through clickhouse-connect, once into the embedded engine
   in this process (chdb://), once over HTTP (Native body, lz4, then uncompressed) into a
   `fleetscope serve-sql` process;
2. query latency: a small aggregate over HTTP, idle and while another process inserts
   100k-row batches over HTTP as fast as it can;
3. slow SELECT: in one process like `fleetscope run` (engine, in-process loader, SQL
   server on the same engine), in-process insert latency idle and while a 5 s aggregate
   runs through the HTTP interface.

Usage: .venv/bin/python bench/sql_http.py [--batches 30] [--out bench/results/sql_http.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleetscope.sqlserver import ServerOptions, SqlServer  # noqa: E402
from fleetscope.store import connect, migrate, table_types  # noqa: E402
from tests.support.sql_http import ServeSql  # noqa: E402

ROWS = 100_000
NAMES = ["time", "node", "pid", "ppid", "cgroup_id", "comm", "exit_code", "signal", "duration_ns"]


def batch(seq: int) -> list[np.ndarray]:
    now = time.time_ns()
    comms = np.array(["sh", "python3", "bash", "systemd", "kworker/0:1", "containerd-shim"], dtype=object)
    return [
        np.arange(ROWS, dtype=np.int64) + now,
        np.full(ROWS, "bench-node", dtype=object),
        np.arange(ROWS, dtype=np.uint32) + seq * ROWS,
        np.ones(ROWS, dtype=np.uint32),
        np.full(ROWS, 4242, dtype=np.uint64),
        comms[np.arange(ROWS) % len(comms)],
        (np.arange(ROWS, dtype=np.int32) % 3),
        np.zeros(ROWS, dtype=np.uint32),
        np.full(ROWS, 1_000_000, dtype=np.uint64),
    ]


def insert_rate(dsn: str, batches: int, label: str, **kw: object) -> tuple[float, list[float]]:
    """rows/s inserting `batches` batches, and each insert's seconds."""
    import clickhouse_connect

    client = connect(dsn) if not kw else clickhouse_connect.get_client(dsn=dsn, autogenerate_session_id=False, **kw)
    migrate(client)
    types = table_types(client, "process_exit")
    data = [batch(i) for i in range(4)]
    times = []
    started = time.monotonic()
    for i in range(batches):
        t = time.monotonic()
        client.insert("fleet.process_exit", data[i % 4], column_names=NAMES, column_oriented=True,
                      column_type_names=[types[n] for n in NAMES],
                      settings={"insert_deduplication_token": f"{label}-{time.time_ns()}-{i}"})  # fmt: skip
        times.append(time.monotonic() - t)
    return batches * ROWS / (time.monotonic() - started), times


def ingest_forever(url: str, seconds: float, counter: multiprocessing.Value) -> None:  # type: ignore[valid-type]
    client = connect(url)
    types = table_types(client, "process_exit")
    data = [batch(i) for i in range(4)]
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        client.insert("fleet.process_exit", data[i % 4], column_names=NAMES, column_oriented=True,
                      column_type_names=[types[n] for n in NAMES],
                      settings={"insert_deduplication_token": f"bg-{time.time_ns()}-{i}"})  # fmt: skip
        i += 1
        with counter.get_lock():
            counter.value += ROWS


def latencies(url: str, n: int) -> list[float]:
    client = connect(url)
    out = []
    for _ in range(n):
        t = time.monotonic()
        client.query("SELECT comm, count(), avg(duration_ns) FROM fleet.process_exit "
                     "WHERE time > now64(9) - INTERVAL 10 SECOND GROUP BY comm")  # fmt: skip
        out.append(time.monotonic() - t)
        time.sleep(0.05)
    return out


def ms(values: list[float]) -> str:
    q = statistics.quantiles(values, n=20) if len(values) > 1 else values * 19
    return f"p50 {statistics.median(values) * 1000:.1f} ms, p95 {q[18] * 1000:.1f} ms, max {max(values) * 1000:.1f} ms"


def slow_select_effect(store: Path, batches: int) -> list[str]:
    """`fleetscope run`'s shape: the loader's client and the SQL server on one engine."""
    local = connect(f"chdb://{store}")
    ready, stop = threading.Event(), threading.Event()
    address: list[str] = []

    def serve() -> None:
        async def main() -> None:
            async with SqlServer(str(store), ServerOptions("127.0.0.1", 0)) as server:
                address.append(server.address)
                ready.set()
                await asyncio.to_thread(stop.wait)

        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ready.wait(60)
    url = f"http://{address[0]}"
    _, idle = insert_rate(f"chdb://{store}", batches, "idle")
    slow_seconds: list[float] = []

    def slow() -> None:
        client = connect(url)
        while not stop.is_set():
            t0 = time.monotonic()
            client.query("SELECT sum(sipHash64(number)) FROM numbers(400000000)")
            slow_seconds.append(time.monotonic() - t0)

    s = threading.Thread(target=slow, daemon=True)
    s.start()
    time.sleep(0.5)
    _, busy = insert_rate(f"chdb://{store}", batches, "busy")
    stop.set()
    s.join()
    t.join(30)
    local.close()
    return [
        f"in-process insert latency, idle:               {ms(idle)}",
        f"in-process insert latency, slow SELECT running: {ms(busy)} "
        f"(the SELECT took {statistics.median(slow_seconds):.1f} s each, {len(slow_seconds)} ran)",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=15.0, help="query-latency phase length")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sql_http.txt"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fs-sqlbench-"))
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus: {os.cpu_count()}  batches: {a.batches} x {ROWS} rows "
        "(fleet.process_exit, 9 columns, dedup token per batch)"
    ]
    local_rate, _ = insert_rate(f"chdb://{tmp / 'local'}", a.batches, "local")
    lines.append(f"insert in-process (chdb://, clickhouse-connect):  {local_rate:,.0f} rows/s")
    with ServeSql(tmp / "served", tmp / "serve.log") as server:
        http_rate, _ = insert_rate(server.url, a.batches, "http")
        plain_rate, _ = insert_rate(server.url, a.batches, "plain", compress=False)
        lines.append(f"insert over HTTP (Native, lz4) to serve-sql:      {http_rate:,.0f} rows/s "
                     f"({http_rate / local_rate:.0%} of in-process)")  # fmt: skip
        lines.append(f"insert over HTTP (Native, uncompressed):          {plain_rate:,.0f} rows/s "
                     f"({plain_rate / local_rate:.0%} of in-process)")  # fmt: skip
        idle = latencies(server.url, 40)
        counter = multiprocessing.Value("q", 0)
        loader = multiprocessing.Process(target=ingest_forever, args=(server.url, a.seconds, counter))
        loader.start()
        time.sleep(1.0)
        started, rows0 = time.monotonic(), counter.value
        busy = latencies(server.url, 60)
        rate = (counter.value - rows0) / (time.monotonic() - started)
        loader.join()
        lines.append(f"small aggregate over HTTP, idle:                  {ms(idle)}")
        lines.append(f"small aggregate over HTTP, ingesting {rate:,.0f} rows/s over HTTP: {ms(busy)}")
    lines += slow_select_effect(tmp / "local", max(10, a.batches // 2))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
