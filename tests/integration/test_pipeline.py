"""End to end through the real CLI processes: kernel -> agent -> Kafka -> ingester -> ClickHouse.

Real eBPF probe in the running kernel, real Apache Kafka broker, real ClickHouse engine
(chdb). 500 short-lived marker processes with distinct arguments and chosen exit codes
must become exactly 500 process_exec and 500 process_exit rows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import lz4.frame
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from fleetscope.codec import MAX_BATCH_BYTES, SCHEMAS, decode_batch
from fleetscope.payload import unpack_message
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
        # pid_max may be small (32768 here): a marker's pid can be reused by a later process,
        # so an exit counts only if it is a child of this test, after the marker's exec
        "SELECT x.pid, x.exit_code, x.signal, x.duration_ns FROM fleet.process_exit AS x "
        "INNER JOIN (SELECT pid, time FROM fleet.process_exec WHERE position(args, "
        f"'{marker}') > 0) AS e ON x.pid = e.pid WHERE x.time >= e.time AND x.ppid = {me}",
    )
    assert len(exits) == N
    assert {int(r[0]): int(r[1]) for r in exits} == {pid: code for pid, (_, code) in expected.items()}
    assert all(r[2] == "0" and int(r[3]) > 0 for r in exits)
    batches = query(
        data_dir,
        "SELECT stream, count(), uniqExact(sequence), max(sequence) FROM fleet.batches GROUP BY stream, epoch",
    )
    for stream, n, uniq, top in batches:
        assert n == uniq == top, f"{stream}: batch sequence has gaps or duplicates"


async def marker_offsets(
    bootstrap: str, prefix: str, marker: str, expected: dict[int, tuple[int, int]]
) -> dict[TopicPartition, int]:
    """Read the topics like an ingester would, until every marker process's exec and exit
    were produced; returns, per partition, the offset after the last message holding one.
    Exit rows are recognised by pid and parent (this test), exec rows by the marker."""
    consumer = AIOKafkaConsumer(
        f"{prefix}.process_exec.v1", f"{prefix}.process_exit.v1",
        bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    me = os.getpid()
    seen: dict[str, set[int]] = {"process_exec": set(), "process_exit": set()}
    last: dict[TopicPartition, int] = {}
    seen_frame = False
    try:
        deadline = time.monotonic() + 60
        while min(len(v) for v in seen.values()) < len(expected) and time.monotonic() < deadline:
            for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                for m in msgs:
                    stream = m.topic.split(".")[-2]
                    # the agent compresses each batch once: a standard LZ4 frame, said in a header
                    assert dict(m.headers)["fs-encoding"] == b"lz4"
                    if not seen_frame:  # the lz4 tool reads it like the library does
                        seen_frame = True
                        if shutil.which("lz4"):
                            cli = await asyncio.to_thread(subprocess.run, ["lz4", "-dc"], input=m.value,
                                                          capture_output=True, check=True)  # fmt: skip
                            assert cli.stdout == lz4.frame.decompress(m.value)
                    batch = decode_batch(SCHEMAS[stream], unpack_message(m.value, m.headers, MAX_BATCH_BYTES))
                    pids, ppids = batch.columns["pid"].tolist(), batch.columns["ppid"].tolist()
                    if stream == "process_exec":
                        hits = {p for p, a in zip(pids, batch.columns["args"].decoded(), strict=True) if marker in a}
                    else:
                        hits = {p for p, pp in zip(pids, ppids, strict=True) if pp == me and p in expected}
                    if hits:
                        seen[stream] |= hits
                        last[tp] = m.offset + 1
    finally:
        await consumer.stop()
    assert {k: len(v) for k, v in seen.items()} == {"process_exec": len(expected), "process_exit": len(expected)}
    return last


class CommitLog:
    """Polls the group's committed offsets in the background and keeps when each value was
    first seen, so the time rows became visible is known however long the test takes to
    find out which offsets it needs."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self.group = group
        self.seen: list[tuple[float, dict[TopicPartition, int]]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CommitLog:
        await self.admin.start()
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.admin.close()

    async def _poll(self) -> None:
        while True:
            offsets = await self.admin.list_consumer_group_offsets(self.group)
            self.seen.append((time.monotonic(), {tp: om.offset for tp, om in offsets.items()}))
            await asyncio.sleep(0.05)

    async def covered(self, offsets: dict[TopicPartition, int], within: float) -> float:
        """When the group's commits first covered `offsets` (AssertionError after `within` s)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self._task is not None and self._task.done():
                self._task.result()  # the poller failed: its error, not a timeout
            for when, committed in self.seen:
                if all(committed.get(tp, -1) >= off for tp, off in offsets.items()):
                    return when
            await asyncio.sleep(0.05)
        raise AssertionError(f"group {self.group} did not commit {offsets} within {within}s")


async def test_processes_become_rows_through_kafka(kafka_broker, bpf_objects, tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    brokers = kafka_broker.bootstrap
    # a fresh group and topics: no stale members to wait out, no other test's batches
    group = prefix = f"pipeline-{uuid.uuid4().hex[:8]}"
    ingest = FleetscopeProcess(
        "ingest", "--brokers", brokers, "--clickhouse", f"chdb://{data_dir}", "--group-id", group,
        "--topic-prefix", prefix, log=tmp_path / "ingest.log",
    )  # fmt: skip
    agent = FleetscopeProcess(
        "agent", "--brokers", brokers, "--bpf-dir", str(bpf_objects), "--status-interval", "1s",
        "--topic-prefix", prefix, "--status-listen", "off",
        log=tmp_path / "agent.log",
    )  # fmt: skip
    with ingest, agent:
        agent.wait_for_log("probe process running", 60)
        ingest.wait_for_log("consuming", 120)
        marker = f"fsmark-{uuid.uuid4().hex[:12]}"
        async with CommitLog(brokers, group) as commits:
            expected = spawn_markers(N, marker)
            last_exit = time.monotonic()
            offsets = await marker_offsets(brokers, prefix, marker, expected)
            visible = await commits.covered(offsets, 60)
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
