"""End-to-end throughput and exec->row latency: kernel -> agent -> Kafka -> ingester -> ClickHouse.

Starts a real Kafka broker, `fleetscope agent` and `fleetscope ingest` (chdb store), runs a
process storm (posix_spawn of /bin/true from several workers), and measures:

- storm rate: exec+exit events/s the kernel produced;
- pipeline rate: events/s from the storm's start until the ingester committed the last one;
- latency: from the last process's exit until the ingester committed its batch
  (commit happens after ClickHouse acknowledged the insert, so the rows are visible).

Usage (root): .venv/bin/python bench/pipeline.py [--processes 20000] [--out bench/results/pipeline.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from multiprocessing import Process
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.kafka_broker import KafkaBroker  # noqa: E402
from tests.support.procs import FleetscopeProcess  # noqa: E402


def storm(n: int) -> None:
    for _ in range(n):
        pid = os.posix_spawn("/bin/true", ["/bin/true", "fsbench"], {})
        os.waitpid(pid, 0)


async def end_offsets(bootstrap: str) -> dict[TopicPartition, int]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await c.start()
    try:
        await c.topics()  # refreshes the cluster metadata
        tps = [
            TopicPartition(t, p)
            for t in ("fleetscope.process_exec.v1", "fleetscope.process_exit.v1")
            for p in c.partitions_for_topic(t) or ()
        ]
        return await c.end_offsets(tps)
    finally:
        await c.stop()


async def committed(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offs = await admin.list_consumer_group_offsets(group)
        return {tp: meta.offset for tp, meta in offs.items()}
    finally:
        await admin.close()


async def wait_drained(bootstrap: str, settle: float = 1.5) -> float:
    """Wait until the agent stopped producing and the ingester committed everything;
    returns the monotonic time of the last commit observed to advance."""
    last_change, last = time.monotonic(), None
    while True:
        ends = await end_offsets(bootstrap)
        done = await committed(bootstrap, "fleetscope-ingest")
        state = (tuple(sorted(ends.items())), tuple(sorted(done.items())))
        if state != last:
            last, last_change = state, time.monotonic()
        caught_up = all(done.get(tp, 0) >= off for tp, off in ends.items())
        if caught_up and time.monotonic() - last_change > settle:
            return last_change
        await asyncio.sleep(0.05)


async def measure(a: argparse.Namespace) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix="fsbench-"))
    broker = KafkaBroker(tmp / "kafka", ROOT / ".cache" / "kafka" / "libs")
    broker.start()
    try:
        store = f"chdb://{tmp}/store"
        ingest = FleetscopeProcess(
            "ingest", "--brokers", broker.bootstrap, "--clickhouse", store, log=tmp / "ingest.log"
        )
        agent = FleetscopeProcess("agent", "--brokers", broker.bootstrap, log=tmp / "agent.log")
        with ingest, agent:
            agent.wait_for_log("probe process running", 60)
            ingest.wait_for_log("consuming", 120)
            await wait_drained(broker.bootstrap)
            per = a.processes // a.workers
            t0 = time.monotonic()
            workers = [Process(target=storm, args=(per,)) for _ in range(a.workers)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            t_last_exit = time.monotonic()
            t_committed = await wait_drained(broker.bootstrap)
            agent.stop()
            ingest.stop()
        events = 2 * per * a.workers
        storm_s = t_last_exit - t0
        lines = [
            f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus: {os.cpu_count()}",
            f"processes: {per * a.workers} ({events} exec+exit events), workers: {a.workers}",
            f"storm: {storm_s:.2f}s = {events / storm_s:.0f} events/s produced by the kernel",
            f"pipeline: {t_committed - t0:.2f}s from storm start to last commit = "
            f"{events / (t_committed - t0):.0f} events/s stored",
            f"latency: last exit -> committed (rows visible): {t_committed - t_last_exit:.2f}s",
        ]
        return lines
    finally:
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline.txt"))
    a = ap.parse_args()
    lines = asyncio.run(measure(a))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
