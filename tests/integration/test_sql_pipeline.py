"""Several fleetscope processes on one embedded store, through `fleetscope serve-sql`.

Real Apache Kafka, real `fleetscope ingest` processes writing over clickhouse-connect's
HTTP transport, as they would to a ClickHouse server: two ingesters in one consumer group
store every batch exactly once; the SQL server going away stops their commits and they
deliver everything once it is back; `fleetscope query` answers while `fleetscope run`
collects (real probes, root).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import clickhouse_connect
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from fleetscope.codec import SCHEMAS, encode_batch
from fleetscope.v1 import batch_pb2
from tests.support.procs import FleetscopeProcess, spawn_markers
from tests.support.sql_http import ServeSql, free_port, wait_until

pytestmark = [pytest.mark.integration]

ROWS = 500  # per batch


def exit_batch(node: str, epoch: int, seq: int) -> tuple[str, bytes]:
    """A process_exit batch of ROWS rows whose pids encode (node, seq, row)."""
    batch_id = f"m-{node}-process_exit-{epoch:x}-{seq}"
    header = batch_pb2.BatchHeader(batch_id=batch_id, stream="process_exit", epoch=epoch, sequence=seq,
                                   created_ns=time.time_ns(), row_count=ROWS)  # fmt: skip
    header.node.host_name, header.node.machine_id = node, f"m-{node}"
    columns = {
        "time": np.full(ROWS, time.time_ns(), np.uint64),
        "pid": np.arange(ROWS, dtype=np.uint32) + seq * ROWS,
        "ppid": np.ones(ROWS, np.uint32),
        "cgroup_id": np.zeros(ROWS, np.uint64),
        "comm": np.array([b"sh"] * ROWS, dtype="S16"),
        "exit_code": np.full(ROWS, seq % 256, np.int32),
        "signal": np.zeros(ROWS, np.uint32),
        "duration_ns": np.full(ROWS, 1000, np.uint64),
    }
    return batch_id, encode_batch(SCHEMAS["process_exit"], header, columns)


async def produce(bootstrap: str, topic: str, nodes: list[str], seqs: range) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for seq in seqs:
            for node in nodes:
                batch_id, payload = exit_batch(node, 1, seq)
                await producer.send(topic, payload, key=node.encode(), headers=[("fs-batch-id", batch_id.encode())])
        await producer.flush()
    finally:
        await producer.stop()


async def lag(bootstrap: str, group: str, topic: str, partitions: int = 4) -> int:
    """Messages of topic not yet committed by group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        behind = 0
        for tp in tps:
            committed = await consumer.committed(tp)
            behind += ends[tp] - (committed or 0)
        return behind
    finally:
        await consumer.stop()


def stored(url: str, nodes: list[str]) -> tuple[int, int, int]:
    """(rows, distinct (node, pid), batches) of our nodes in the store."""
    c = clickhouse_connect.get_client(dsn=url)
    rows = c.query(
        "SELECT count(), uniqExact(node, pid), (SELECT count() FROM fleet.batches WHERE node IN {n:Array(String)}) "
        "FROM fleet.process_exit WHERE node IN {n:Array(String)}",
        parameters={"n": nodes},
    ).result_rows[0]
    return int(rows[0]), int(rows[1]), int(rows[2])


def ingester(brokers: str, url: str, prefix: str, group: str, log: Path) -> FleetscopeProcess:
    return FleetscopeProcess(
        "ingest", "--brokers", brokers, "--clickhouse", url, "--topic-prefix", prefix, "--group-id", group,
        "--retry-backoff-max", "1s", "--max-poll-records", "8", log=log,
    )  # fmt: skip


@pytest.mark.kafka
async def test_two_ingesters_through_serve_sql_store_every_batch_once(kafka_broker, tmp_path: Path) -> None:
    prefix, group = f"fs{uuid.uuid4().hex[:8]}", "sqlhttp-two"
    topic = f"{prefix}.process_exit.v1"
    kafka_broker.create_topic(topic, partitions=4)
    nodes = [f"n{uuid.uuid4().hex[:6]}-{i}" for i in range(8)]
    with ServeSql(tmp_path / "store", tmp_path / "serve.log") as server:
        a = ingester(kafka_broker.bootstrap, server.url, prefix, group, tmp_path / "a.log")
        b = ingester(kafka_broker.bootstrap, server.url, prefix, group, tmp_path / "b.log")
        with a, b:
            a.wait_for_log("consuming", 120)
            b.wait_for_log("consuming", 120)
            await produce(kafka_broker.bootstrap, topic, nodes, range(1, 26))  # 200 batches
            expected = (200 * ROWS, 200 * ROWS, 200)
            deadline = time.monotonic() + 90
            while stored(server.url, nodes) != expected or await lag(kafka_broker.bootstrap, group, topic):
                assert time.monotonic() < deadline, f"stored {stored(server.url, nodes)}, want {expected}"
                await asyncio.sleep(0.2)
            a.stop()
            b.stop()
        assert a.returncode == 0 and b.returncode == 0
        both = [p.log_text() for p in (a, b)]
        assert all("'batches_inserted':" in t for t in both), "each ingester should have loaded batches"
        assert stored(server.url, nodes) == expected


@pytest.mark.kafka
async def test_ingesters_retry_while_serve_sql_is_down(kafka_broker, tmp_path: Path) -> None:
    prefix, group = f"fs{uuid.uuid4().hex[:8]}", "sqlhttp-down"
    topic = f"{prefix}.process_exit.v1"
    kafka_broker.create_topic(topic, partitions=4)
    nodes = [f"d{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = tmp_path / "store"
    first = ServeSql(store, tmp_path / "serve1.log", listen=f"127.0.0.1:{port}").start()
    ing = ingester(kafka_broker.bootstrap, url, prefix, group, tmp_path / "ingest.log")
    try:
        with ing:
            ing.wait_for_log("consuming", 120)
            await produce(kafka_broker.bootstrap, topic, nodes, range(1, 11))
            wait_until(lambda: stored(url, nodes)[2] == 40, 60, "the first 40 batches stored")
            first.stop()
            assert first.returncode == 0
            await produce(kafka_broker.bootstrap, topic, nodes, range(11, 21))
            ing.wait_for_log("offsets not committed", 60)
            await asyncio.sleep(3)
            behind = await lag(kafka_broker.bootstrap, group, topic)
            assert behind > 0, "offsets were committed while the store was down"
            with ServeSql(store, tmp_path / "serve2.log", listen=f"127.0.0.1:{port}"):
                deadline = time.monotonic() + 90
                want = (80 * ROWS, 80 * ROWS, 80)
                while stored(url, nodes) != want or await lag(kafka_broker.bootstrap, group, topic):
                    assert time.monotonic() < deadline, f"stored {stored(url, nodes)} after the restart"
                    await asyncio.sleep(0.2)
                ing.stop()
                assert ing.returncode == 0
                assert "clickhouse inserts succeed again" in ing.log_text()
    finally:
        first.stop()


@pytest.mark.root
async def test_query_answers_while_run_collects(bpf_objects, tmp_path: Path) -> None:
    port = free_port()
    run = FleetscopeProcess(
        "run", "--data-dir", str(tmp_path / "store"), "--bpf-dir", str(bpf_objects), "--status", "log",
        "--sql-listen", f"127.0.0.1:{port}", log=tmp_path / "run.log",
    )  # fmt: skip
    with run:
        run.wait_for_log("probe process running", 120)
        run.wait_for_log("serving the ClickHouse HTTP interface", 10)
        marker = f"fsq-{uuid.uuid4().hex[:10]}"
        spawn_markers(50, marker)

        def count() -> int:
            out = subprocess.run(
                [sys.executable, "-m", "fleetscope", "query", "--clickhouse", f"http://127.0.0.1:{port}", "--format",
                 "tsv", f"SELECT count() FROM fleet.process_exec WHERE comm = 'sh' AND position(args, '{marker}') > 0"],
                capture_output=True, text=True, timeout=60, check=True, env={**os.environ},
            )  # fmt: skip
            return int(out.stdout.splitlines()[1])

        wait_until(lambda: count() == 50, 30, "fleetscope query seeing the 50 marker processes")
        assert run.proc is not None and run.proc.poll() is None, "run should still be collecting"
        run.stop()
    assert run.returncode == 0, run.log_text()[-3000:]
