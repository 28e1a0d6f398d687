"""End to end through the real CLI processes: kernel -> agent -> Kafka -> ingester -> ClickHouse.

Real eBPF probe in the running kernel, real Apache Kafka broker, real ClickHouse engine
(chdb). 500 short-lived marker processes with distinct arguments and chosen exit codes
must become exactly 500 process_exec and 500 process_exit rows.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from fleetscope.codec import SCHEMAS, decode_batch
from tests.support.procs import FleetscopeProcess, spawn_markers

pytestmark = [pytest.mark.root, pytest.mark.kafka, pytest.mark.integration]

N = 500


def query(data_dir: Path, sql: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "fleetscope", "query", "--data-dir", str(data_dir), "--format", "tsv", sql],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [line.split("\t") for line in out.stdout.splitlines()[1:]]


def assert_marker_rows(data_dir: Path, marker: str, expected: dict[int, tuple[int, int]]) -> None:
    """Exactly one exec and one exit row per marker process, with the right fields."""
    me = str(os.getpid())
    rows = query(
        data_dir,
        "SELECT pid, ppid, filename, args, comm FROM fleet.process_exec "
        f"WHERE position(args, '{marker}') > 0 ORDER BY pid",
    )
    assert len(rows) == N
    by_pid = {int(r[0]): r for r in rows}
    assert sorted(by_pid) == sorted(expected)
    for pid, (_, ppid, filename, args, comm) in by_pid.items():
        i, code = expected[pid]
        assert ppid == me
        assert filename == "/bin/sh"
        assert comm == "sh"
        assert args == f"/bin/sh -c exit {code} {marker}-{i}"
    exits = query(
        data_dir,
        "SELECT pid, exit_code, signal, duration_ns FROM fleet.process_exit "
        f"WHERE pid IN (SELECT pid FROM fleet.process_exec WHERE position(args, '{marker}') > 0)",
    )
    assert len(exits) == N
    assert {int(r[0]): int(r[1]) for r in exits} == {pid: code for pid, (_, code) in expected.items()}
    assert all(r[2] == "0" and int(r[3]) > 0 for r in exits)
    batches = query(
        data_dir,
        "SELECT stream, count(), uniqExact(sequence), max(sequence) FROM fleet.batches GROUP BY stream",
    )
    for stream, n, uniq, top in batches:
        assert n == uniq == top, f"{stream}: batch sequence has gaps or duplicates"


async def marker_offsets(bootstrap: str, marker: str, want: int) -> dict[TopicPartition, int]:
    """Read the topics like an ingester would, until `want` marker rows of each stream
    were produced; returns, per partition, the offset after the last message holding one."""
    consumer = AIOKafkaConsumer(
        "fleetscope.process_exec.v1", "fleetscope.process_exit.v1",
        bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    seen = {"process_exec": 0, "process_exit": 0}
    pids: set[int] = set()
    last: dict[TopicPartition, int] = {}
    try:
        deadline = time.monotonic() + 60
        while min(seen.values()) < want and time.monotonic() < deadline:
            for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                for m in msgs:
                    stream = m.topic.split(".")[1]
                    batch = decode_batch(SCHEMAS[stream], m.value)
                    if stream == "process_exec":
                        args = batch.columns["args"].decoded()
                        hit = [marker in a for a in args]
                        pids.update(int(p) for p, h in zip(batch.columns["pid"], hit, strict=True) if h)
                    else:
                        hit = [int(p) in pids for p in batch.columns["pid"]]
                    if any(hit):
                        seen[stream] += sum(hit)
                        last[tp] = m.offset + 1
    finally:
        await consumer.stop()
    assert seen == {"process_exec": want, "process_exit": want}
    return last


async def wait_committed(
    bootstrap: str, group: str, offsets: dict[TopicPartition, int], within: float
) -> float:
    """Poll the group's committed offsets until they cover `offsets`; returns when."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            done = True
            for tp, off in offsets.items():
                committed = await consumer.committed(tp)
                done &= committed is not None and committed >= off
            if done:
                return time.monotonic()
            await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
    raise AssertionError(f"group {group} did not commit {offsets} within {within}s")


async def test_processes_become_rows_through_kafka(kafka_broker, bpf_objects, tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    brokers = kafka_broker.bootstrap
    group = f"pipeline-{uuid.uuid4().hex[:8]}"  # a fresh group: no stale members from other tests to wait out
    ingest = FleetscopeProcess(
        "ingest", "--brokers", brokers, "--clickhouse", f"chdb://{data_dir}", "--group-id", group,
        log=tmp_path / "ingest.log",
    )  # fmt: skip
    agent = FleetscopeProcess(
        "agent", "--brokers", brokers, "--bpf-dir", str(bpf_objects), "--status-interval", "1s",
        log=tmp_path / "agent.log",
    )  # fmt: skip
    with ingest, agent:
        agent.wait_for_log("probe process running", 60)
        ingest.wait_for_log("consuming", 120)
        marker = f"fsmark-{uuid.uuid4().hex[:12]}"
        expected = spawn_markers(N, marker)
        last_exit = time.monotonic()
        offsets = await marker_offsets(brokers, marker, N)
        visible = await wait_committed(brokers, group, offsets, 60)
        latency = visible - last_exit
        print(f"exec->row latency for the last of {N} processes: {latency:.2f}s")
        assert latency < 5.0, f"rows became visible {latency:.2f}s after the last exit"
        agent.stop()
        ingest.stop()
    assert agent.returncode == 0 and ingest.returncode == 0
    assert "final:" in agent.log_text()
    assert_marker_rows(data_dir, marker, expected)


async def test_processes_become_rows_in_single_node_mode(bpf_objects, tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    run = FleetscopeProcess(
        "run", "--data-dir", str(data_dir), "--bpf-dir", str(bpf_objects), "--status", "log", "--sql-listen", "off",
        "--status-interval", "1s", log=tmp_path / "run.log",
    )  # fmt: skip
    with run:
        run.wait_for_log("probe process running", 120)
        marker = f"fsmark-{uuid.uuid4().hex[:12]}"
        expected = spawn_markers(N, marker)
        # Ctrl-C right away: shutdown must drain the rings and flush every batch
        run.stop(signal.SIGINT)
    assert run.returncode == 0, run.log_text()
    assert_marker_rows(data_dir, marker, expected)
