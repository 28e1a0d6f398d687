"""What the agent's disk spool costs, and how fast it empties after an outage.

1. Spool cost per batch (no broker): append (writev into the page cache, CRC-32), read back
   (pread, CRC check) and acknowledge, for batch sizes the agent produces, in ns per
   encoded byte; bench/results/agent_cost.txt has what the agent spends per event (e.g.
   2,600 ns for an exec, about 120 encoded bytes: ~20 ns per byte). This decides "always
   through the spool" against "only while the broker is away".
2. Replay: N batches left in a spool by an agent without a broker, delivered by a new sink
   to a real broker with 1 (send_and_wait one at a time) or 8 batches in flight.

    .venv/bin/python bench/spool.py [--bootstrap HOST:PORT]   # else starts its own broker
Writes bench/results/spool.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import RESULTS, Broker, header  # noqa: E402
from node_agent.batcher import Batch  # noqa: E402
from node_agent.shipper import KafkaSink  # noqa: E402
from node_agent.spool import Spool  # noqa: E402

SIZES = (16 << 10, 256 << 10, 1 << 20)


def spool_cost(tmp: Path, size: int, n: int) -> tuple[float, float, float]:
    """Median microseconds per batch: append, next (read + check), ack."""
    spool = Spool(tmp / f"cost-{size}", 4 << 30, Counter())
    spool.open()
    payload = bytes(range(256)) * (size // 256)
    appends, reads, acks = [], [], []
    for seq in range(n):
        t0 = time.perf_counter()
        spool.append("process_exec", f"b-{seq}", seq, 1000, 0, b"node", [("fs-batch-id", b"b")], 1, payload)
        t1 = time.perf_counter()
        rec = spool.next()
        t2 = time.perf_counter()
        assert rec is not None
        spool.ack(rec)
        t3 = time.perf_counter()
        appends.append(t1 - t0)
        reads.append(t2 - t1)
        acks.append(t3 - t2)
    spool.close()
    us = 1e6
    return statistics.median(appends) * us, statistics.median(reads) * us, statistics.median(acks) * us


async def replay(bootstrap: str, tmp: Path, n: int, size: int, in_flight: int) -> float:
    """Seconds for a new sink to deliver n spooled batches of `size` bytes."""
    spool_dir = tmp / f"replay-{in_flight}"
    prefix = f"spoolbench{time.time_ns()}"
    offline = KafkaSink(("127.0.0.1:1",), prefix, spool_dir, 8 << 30)
    await offline.start()
    payload = os.urandom(size)  # incompressible: the sink's LZ4 frames are `size` bytes too
    for seq in range(1, n + 1):
        stream = ("process_exec", "process_exit", "tcp_connections")[seq % 3]
        offline.submit(Batch(stream, f"b-{stream}-{seq}", seq, 100, payload, b"node", 0))
    await offline.stop(0)
    # the topics exist before the clock starts: their auto-creation is not the spool's cost
    warm = KafkaSink((bootstrap,), prefix, tmp / f"warm-{in_flight}", 1 << 30, max_in_flight=in_flight)
    await warm.start()
    for stream in ("process_exec", "process_exit", "tcp_connections"):
        warm.submit(Batch(stream, f"w-{stream}", 1, 1, b"x", b"node", 0))
    await warm.stop(30)
    sink = KafkaSink((bootstrap,), prefix, spool_dir, 8 << 30, max_in_flight=in_flight)
    t0 = time.monotonic()
    await sink.start()
    await sink.wait_drained()
    elapsed = time.monotonic() - t0
    await sink.stop(5)
    assert sum(v for k, v in sink.counters.items() if k.endswith(".batches_shipped")) == n
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", help="a running broker (default: start one)")
    ap.add_argument("--replay-batches", type=int, default=3000)
    ap.add_argument("--replay-bytes", type=int, default=64 << 10)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fsbench-spool-"))
    out = [header(), "== spool cost per batch (page cache; median of 200)"]
    try:
        for size in SIZES:
            app, read, ack = spool_cost(tmp, size, 200)
            total = app + read + ack
            out.append(f"{size >> 10:>5} KiB: append {app:7.0f} us  read+check {read:7.0f} us  ack {ack:5.0f} us  "
                       f"= {total:7.0f} us, {total * 1000 / size:5.2f} ns/byte ({size / total:5.0f} MB/s)")  # fmt: skip
        out.append(f"== replay of {a.replay_batches} spooled batches of {a.replay_bytes >> 10} KiB to a real broker")
        if a.bootstrap:
            runs = {k: asyncio.run(replay(a.bootstrap, tmp, a.replay_batches, a.replay_bytes, k)) for k in (1, 8)}
        else:
            with Broker() as broker:
                runs = {k: asyncio.run(replay(broker.bootstrap, tmp, a.replay_batches, a.replay_bytes, k))
                        for k in (1, 8)}  # fmt: skip
        for k, secs in runs.items():
            mb = a.replay_batches * a.replay_bytes / secs / 1e6
            out.append(f"max_in_flight {k}: {secs:6.2f} s  {a.replay_batches / secs:7.0f} batches/s  {mb:6.1f} MB/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(out) + "\n"
    print(text, end="")
    (RESULTS / "spool.txt").write_text(text)


if __name__ == "__main__":
    main()
