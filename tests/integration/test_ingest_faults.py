"""Fault tests of the ingester (issue 6): real Apache Kafka, real ClickHouse engine behind
`fleetscope serve-sql`, real `fleetscope ingest` processes, and where events come from the
kernel a real agent with marker processes.

- ingesters SIGKILLed every few seconds for a minute while two share the group: every
  marker row stored exactly once, no sequence gaps or duplicate batches;
- ClickHouse unreachable (a closed port), then the ingester restarted with the real DSN:
  degraded health meanwhile, no offsets committed, nothing lost, nothing twice;
- 100k malformed and hostile messages interleaved with valid batches (of the previous,
  this and a newer minor version): every bad one in the dead-letter topic (exactly, by
  source offset), every valid row stored, RSS bounded;
- one of two ingesters cut off from ClickHouse: it pauses at its in-flight bound, reports
  degraded health, gives its partitions to the other after max_poll_interval and rejoins.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import clickhouse_connect
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from fleetscope import metrics, payload
from fleetscope.codec import SCHEMAS, encode_batch
from fleetscope.v1 import batch_pb2, process_pb2
from tests.integration.test_agent_faults import (
    LOSS,
    agent_process,
    assert_markers_stored_once,
    assert_nothing_lost,
    loss_totals,
    marker_queries,
    wait_ingested,
)
from tests.support.cut_proxy import CutProxy
from tests.support.procs import FleetscopeProcess, spawn_markers
from tests.support.sql_http import ServeSql, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


# --- helpers ---------------------------------------------------------------------------


def ingester(brokers: str, url: str, prefix: str, group: str, log: Path, *extra: str) -> FleetscopeProcess:
    return FleetscopeProcess(
        "ingest", "--brokers", brokers, "--clickhouse", url, "--topic-prefix", prefix, "--group-id", group,
        "--retry-backoff-max", "1s", "--max-poll-records", "16", "--stats-interval", "1s", *extra, log=log,
    )  # fmt: skip


def health_port(proc: FleetscopeProcess) -> int:
    proc.wait_for_log("ingester health at", 60)
    line = next(ln for ln in proc.log_text().splitlines() if "ingester health at" in ln)
    return int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    return metrics.parse(text).get((name, frozenset(labels.items())), 0.0)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def group_lag(bootstrap: str, group: str, topics: list[str], partitions: int = 4) -> int:
    """Messages of the topics not yet committed by the group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        behind = 0
        for tp in tps:
            behind += ends[tp] - ((await consumer.committed(tp)) or 0)
        return behind
    finally:
        await consumer.stop()


async def wait_async(measure: Callable[[], Awaitable[object]], want: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while (got := await measure()) != want:
        assert time.monotonic() < deadline, f"{what}: {got!r}, want {want!r}, after {within}s"
        await asyncio.sleep(0.2)


def client(url: str):
    return clickhouse_connect.get_client(dsn=url)


# --- hostile input ---------------------------------------------------------------------

BAD = 100_000
VALID = 120  # batches of VALID_ROWS rows, interleaved with the bad messages
VALID_ROWS = 250
MAX_BATCH = 64 << 10  # the ingester's max_batch_bytes in this test


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def exit_batch(node: str, seq: int, rows: int = VALID_ROWS, **header: object) -> bytes:
    h = batch_pb2.BatchHeader(batch_id=f"m-{node}-process_exit-1-{seq}", stream="process_exit", epoch=1,
                              sequence=seq, created_ns=time.time_ns(), row_count=rows, schema_minor=1)  # fmt: skip
    for k, v in header.items():
        setattr(h, k, v)
    h.node.host_name = node
    cols = {
        "time": np.full(rows, time.time_ns(), np.uint64), "pid": np.arange(rows, dtype=np.uint32) + seq * rows,
        "ppid": np.ones(rows, np.uint32), "cgroup_id": np.zeros(rows, np.uint64),
        "comm": np.array([b"sh", b"ls"] * rows, dtype="S16")[:rows], "exit_code": np.zeros(rows, np.int32),
        "signal": np.zeros(rows, np.uint32), "duration_ns": np.ones(rows, np.uint64),
    }  # fmt: skip
    for c in SCHEMAS["process_exit"].columns:  # the later minors' columns its minor must have (zeros)
        if c.name not in cols and not c.may_be_absent(h.schema_minor):
            cols[c.name] = np.zeros(rows, c.dtype) if c.dtype is not None else np.zeros(rows, "S1")
    return encode_batch(SCHEMAS["process_exit"], h, cols)


def hostile_messages(rng: random.Random, node: str) -> list[tuple[str, bytes, list[tuple[str, bytes]], str]]:
    """BAD messages as (key, value, headers, the dead-letter kind expected)."""
    template = exit_batch(node, 999_999, rows=8)
    absurd = process_pb2.ProcessExitBatch.FromString(template)
    absurd.comm.index[3] = 4_000_000_000
    absurd_wire = absurd.SerializeToString()
    huge_rows = exit_batch(node, 999_998, rows=8).replace(b"\x38\x08", b"\x38" + _varint(2**31), 1)
    exec_header = exit_batch(node, 999_997, rows=8, stream="process_exec")
    v2 = [("fs-schema", b"fleetscope.v2.process_exit;minor=0")]
    lz4 = [("fs-encoding", b"lz4")]
    frame = payload.compress(template)
    bomb = payload.compress(bytes(MAX_BATCH * 4))  # a few hundred bytes on the wire
    keys = [node.encode(), b"", b"\xff\xfe", *(f"hostile-{i}".encode() for i in range(2000))]
    out = []
    for i in range(BAD):
        key = keys[i % len(keys)]
        kind = i % 9
        if kind == 0:  # random bytes
            out.append((key, rng.randbytes(rng.randrange(0, 600)), [], "malformed"))
        elif kind == 1:  # a valid batch cut short
            out.append((key, template[: rng.randrange(0, len(template))], [], "malformed"))
        elif kind == 2:  # a field declaring ~2^62 bytes
            out.append((key, b"\x0a" + _varint(2**62 + i) + template[:40], [], "malformed"))
        elif kind == 3:  # 2^31 rows declared in the header
            out.append((key, huge_rows, [], "malformed"))
        elif kind == 4:  # a major version this ingester does not read
            out.append((key, template, v2, "unknown-version"))
        elif kind == 5:  # a dictionary index far outside the dictionary
            out.append((key, absurd_wire, [], "malformed"))
        elif kind == 6:  # another stream's batch on this topic
            out.append((key, exec_header, [], "malformed"))
        elif kind == 7:  # empty, or a tombstone-sized nothing
            out.append((key, b"", [("fs-schema", b"fleetscope.v1.process_exit;minor=1")], "malformed"))
        elif i % 1000 == 8:  # bigger than max_batch_bytes (a few: they are big)
            out.append((key, rng.randbytes(MAX_BATCH + 1), [], "oversized"))
        elif i // 9 % 5 == 1:  # fs-encoding lz4: not an LZ4 frame
            out.append((key, rng.randbytes(rng.randrange(0, 600)), lz4, "malformed"))
        elif i // 9 % 5 == 2:  # fs-encoding lz4: a frame cut short
            out.append((key, frame[: rng.randrange(0, len(frame))], lz4, "malformed"))
        elif i // 9 % 5 == 3:  # fs-encoding lz4: decompresses beyond max_batch_bytes
            out.append((key, bomb, lz4, "oversized"))
        elif i // 9 % 5 == 4:  # an encoding this ingester does not read
            out.append((key, frame, [("fs-encoding", b"zstd")], "malformed"))
        else:  # random header value in fs-schema
            out.append((key, template, [("fs-schema", rng.randbytes(20))], "malformed"))
    return out


async def produce_batched(
    producer: AIOKafkaProducer, topic: str, messages: list[tuple[bytes, bytes, list[tuple[str, bytes]], str]]
) -> dict[str, str]:
    """Send the messages round-robin over 4 partitions, in record batches (one aiokafka call
    per batch, not per message); returns "topic/partition@offset" -> expected kind of the bad ones."""
    expected: dict[str, str] = {}
    pending: list[tuple[asyncio.Future[object], int, list[str]]] = []
    builders = {p: (producer.create_batch(), []) for p in range(4)}

    async def ship(p: int) -> None:
        batch, kinds = builders[p]
        pending.append((await producer.send_batch(batch, topic, partition=p), p, kinds))
        builders[p] = (producer.create_batch(), [])

    for i, (key, value, headers, kind) in enumerate(messages):
        p = i % 4
        while builders[p][0].append(key=key, value=value, timestamp=None, headers=headers) is None:
            await ship(p)  # full: send it and start the next
        builders[p][1].append(kind)
    for p in builders:
        if builders[p][1]:
            await ship(p)
    for fut, p, kinds in pending:
        base = (await fut).offset  # type: ignore[attr-defined]
        expected.update({f"{topic}/{p}@{base + j}": k for j, k in enumerate(kinds) if k})
    return expected


async def test_hostile_messages_go_to_the_dlq_and_valid_rows_are_stored(kafka_broker, tmp_path: Path) -> None:
    prefix, group = f"fs{uuid.uuid4().hex[:8]}", f"hostile-{uuid.uuid4().hex[:8]}"
    topic, dlq_topic = f"{prefix}.process_exit.v1", f"{prefix}.dlq.v1"
    kafka_broker.create_topic(topic, partitions=4)
    # a dead-letter topic that refuses the oversized messages whole: they go there cut
    kafka_broker.create_topic(dlq_topic, partitions=4, config={"max.message.bytes": str(MAX_BATCH // 2)})
    node = f"h{uuid.uuid4().hex[:6]}"
    rng = random.Random(6)
    bad = hostile_messages(rng, node)
    # valid: of this minor, compressed like an agent does; of a newer minor (fields this ingester
    # does not know, of every wire type); of minor 0 (before the identity columns, which the
    # batches leave out); the last two raw (no fs-encoding header), like older agents send them
    newer = [("fs-schema", b"fleetscope.v1.process_exit;minor=7")]
    unknown = (_varint(150 << 3) + _varint(2**40) + _varint(151 << 3 | 1) + b"\1" * 8
               + _varint(152 << 3 | 2) + _varint(5) + b"extra" + _varint(153 << 3 | 5) + b"\2" * 4)  # fmt: skip
    valid = [
        (node.encode(), exit_batch(node, seq, schema_minor=7) + unknown, newer, "") if seq % 3 == 0
        else (node.encode(), exit_batch(node, seq, schema_minor=0), [], "") if seq % 3 == 1
        else (node.encode(), payload.compress(exit_batch(node, seq)), [("fs-encoding", b"lz4")], "")
        for seq in range(1, VALID + 1)
    ]  # fmt: skip
    stream = bad + valid
    rng.shuffle(stream)
    with ServeSql(tmp_path / "store", tmp_path / "serve.log") as server:
        ing = ingester(kafka_broker.bootstrap, server.url, prefix, group, tmp_path / "ingest.log",
                       "--dlq-topic", dlq_topic, "--max-batch-bytes", str(MAX_BATCH),
                       "--max-in-flight-bytes", "4MiB", "--max-poll-records", "500", "--health-listen",
                       "127.0.0.1:0")  # fmt: skip
        with ing:
            port = health_port(ing)
            ing.wait_for_log("consuming", 120)
            assert ing.proc is not None
            baseline, cpu0 = rss_bytes(ing.proc.pid), cpu_seconds(ing.proc.pid)
            producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks=1, linger_ms=20,
                                        max_request_size=4 << 20, compression_type="lz4")  # fmt: skip
            await producer.start()
            started = time.monotonic()
            try:
                expected_bad = await produce_batched(producer, topic, stream)
            finally:
                await producer.stop()
            produced = time.monotonic() - started
            assert len(expected_bad) == BAD

            peak, dead, kinds, cut = baseline, {}, Counter(), 0
            encoded: Counter[str] = Counter()  # dead letters of fs-encoding messages, by kind
            dlq = AIOKafkaConsumer(dlq_topic, bootstrap_servers=kafka_broker.bootstrap, group_id=None,
                                   auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20)  # fmt: skip
            await dlq.start()
            try:
                deadline = time.monotonic() + 120
                while len(dead) < BAD or stored_rows(server.url, node) < VALID * VALID_ROWS:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{len(dead)} dead letters, {stored_rows(server.url, node)} rows")
                    peak = max(peak, rss_bytes(ing.proc.pid))
                    for msgs in (await dlq.getmany(timeout_ms=200, max_records=20_000)).values():
                        for m in msgs:
                            h = dict(m.headers)
                            source = h["fs-source"].decode()
                            assert source not in dead, f"{source} dead-lettered twice"
                            dead[source] = h["fs-dlq-kind"].decode()
                            assert h["fs-dlq-reason"]
                            if "fs-dlq-truncated-from" in h:  # the oversized ones, cut to 16 KiB
                                assert int(h["fs-dlq-truncated-from"]) == MAX_BATCH + 1 and len(m.value) == 16 << 10
                                cut += 1
                            kinds[dead[source]] += 1
                            if "fs-encoding" in h:  # the original headers, unchanged
                                assert h["fs-dlq-reason"].startswith(b"fs-encoding "), h["fs-dlq-reason"]
                                encoded[dead[source]] += 1
                                if h["fs-encoding"] == b"zstd":
                                    assert b"reads lz4" in h["fs-dlq-reason"], h["fs-dlq-reason"]
                await asyncio.sleep(1)  # nothing more may arrive
                assert not await dlq.getmany(timeout_ms=500)
            finally:
                await dlq.stop()
            elapsed, cpu = time.monotonic() - started, cpu_seconds(ing.proc.pid) - cpu0
            assert dead == expected_bad  # every bad message, exactly once, for the right reason
            assert cut == sum(len(value) > MAX_BATCH for _, value, _, _ in bad) > 0  # the LZ4 bombs are small
            assert encoded == Counter(kind for _, _, headers, kind in bad if headers and headers[0][0] == "fs-encoding")
            assert encoded["malformed"] > 0 and encoded["oversized"] > 0
            assert stored_rows(server.url, node) == VALID * VALID_ROWS
            c = client(server.url)
            assert c.command(f"SELECT count() FROM fleet.batches WHERE node = '{node}'") == VALID
            await wait_async(lambda: group_lag(kafka_broker.bootstrap, group, [topic]), 0, 30, "all offsets committed")
            status, text = http_get(port, "/metrics")
            assert status == 200
            assert sample(text, "fleetscope_ingester_batches_dead_lettered_total", stream="process_exit") == BAD
            for kind, n in kinds.items():
                assert sample(text, "fleetscope_ingester_dead_lettered_by_kind_total", kind=kind) == n
            assert sample(text, "fleetscope_ingester_batches_inserted_total", stream="process_exit") == VALID
            assert http_get(port, "/healthz") == (200, "ready\n")
            ing.stop()
        assert ing.returncode == 0, ing.log_text()[-3000:]
        counted = c.command("SELECT sum(value) FROM fleet.pipeline_stats WHERE stage = 'ingester' "
                            "AND counter = 'batches_dead_lettered' AND stream = 'process_exit'")  # fmt: skip
        assert counted == BAD  # the loss is in pipeline_stats too, with hostile keys folded into "(other)"
    growth = peak - baseline
    print(f"\n{BAD} hostile + {VALID} valid messages: produced in {produced:.1f}s, all handled in {elapsed:.1f}s; "
          f"ingester RSS {baseline / 2**20:.0f} MiB -> peak {peak / 2**20:.0f} MiB (+{growth / 2**20:.0f} MiB); "
          f"ingester CPU {cpu:.1f}s; kinds {dict(kinds)}")  # fmt: skip
    assert growth < 96 << 20, f"ingester RSS grew by {growth / 2**20:.0f} MiB"


def stored_rows(url: str, node: str) -> int:
    return int(client(url).command(f"SELECT count() FROM fleet.process_exit WHERE node = '{node}'"))


async def test_lz4_batches_are_inserted_within_insert_max_bytes_once_decompressed(kafka_broker, tmp_path: Path) -> None:
    """40 LZ4 batches of 11 KB (1.2 KB on the wire): an insert_max_bytes of 16 KiB takes a
    dozen messages at a time, but inserts at most two batches at once (decoded bytes)."""
    prefix, group = f"fs{uuid.uuid4().hex[:8]}", f"lz4-{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}.process_exit.v1"
    kafka_broker.create_topic(topic, partitions=1)
    node, n = f"z{uuid.uuid4().hex[:6]}", 40
    batches = [exit_batch(node, seq) for seq in range(1, n + 1)]
    assert all(11_000 < len(b) < 16 << 10 for b in batches)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    await producer.start()
    try:
        for b in batches:  # already there when the ingester starts: it fetches them in bulk
            await producer.send_and_wait(topic, payload.compress(b), key=node.encode(),
                                         headers=[("fs-encoding", b"lz4")])  # fmt: skip
    finally:
        await producer.stop()
    with ServeSql(tmp_path / "store", tmp_path / "serve.log") as server:
        ing = ingester(kafka_broker.bootstrap, server.url, prefix, group, tmp_path / "ingest.log",
                       "--insert-max-bytes", "16KiB", "--health-listen", "127.0.0.1:0")  # fmt: skip
        with ing:
            port = health_port(ing)
            ing.wait_for_log("consuming", 120)
            await wait_async(lambda: asyncio.to_thread(stored_rows, server.url, node), n * VALID_ROWS, 120, "rows")
            _, text = http_get(port, "/metrics")
            ing.stop()
        assert ing.returncode == 0, ing.log_text()[-3000:]
    inserts = sample(text, "fleetscope_ingester_insert_seconds_count")
    assert sample(text, "fleetscope_ingester_batches_inserted_total", stream="process_exit") == n
    assert n / 2 <= inserts <= n, f"{inserts} inserts for {n} batches"


# --- with a real agent on real kernel events ---------------------------------------------

KILL_PHASE = 60.0  # seconds of killing
KILL_EVERY = 3.0  # one of the two ingesters is SIGKILLed this often


def http_queries(url: str, *sqls: str) -> list[list[list[object]]]:
    c = client(url)
    return [[list(r) for r in c.query(q).result_rows] for q in sqls]


def start_agent(bootstrap: str, bpf: Path, prefix: str, tmp: Path, node: str) -> tuple[FleetscopeProcess, int]:
    port = free_port()
    agent = agent_process(bootstrap, bpf, prefix, tmp / "spool", port, tmp / "agent.log", "--node-name", node)
    agent.start()
    agent.wait_for_log("probe process running", 120)
    return agent, port


def check_store(url: str, marker: str, expected: dict[int, tuple[int, int]]) -> dict[str, list[int]]:
    """Every marker process once in process_exec and process_exit; nothing lost or doubled in
    pipeline_loss (after the agent stopped and the group committed everything)."""
    execs, exits, loss = http_queries(url, *marker_queries(marker), LOSS)
    try:
        assert_markers_stored_once(execs, exits, marker, expected)
    except AssertionError as e:  # say where the rows went
        raise AssertionError(f"{e}\npipeline_loss: {loss_totals(loss)}") from None
    totals = loss_totals(loss)
    assert_nothing_lost(totals)
    return totals


@pytest.mark.root
async def test_ingesters_sigkilled_repeatedly_store_every_event_once(kafka_broker, bpf_objects, tmp_path: Path) -> None:
    prefix = group = f"kill-{uuid.uuid4().hex[:8]}"
    for stream in ("process_exec", "process_exit", "pipeline_stats"):
        kafka_broker.create_topic(f"{prefix}.{stream}.v1", partitions=4)
    with ServeSql(tmp_path / "store", tmp_path / "serve.log") as server:
        agent, _ = start_agent(kafka_broker.bootstrap, bpf_objects, prefix, tmp_path, f"n-{prefix}")
        logs = [tmp_path / "ingest-a.log", tmp_path / "ingest-b.log"]
        args = ("--health-listen", "127.0.0.1:0")
        ings = [ingester(kafka_broker.bootstrap, server.url, prefix, group, log, *args).start() for log in logs]
        try:
            for ing in ings:
                ing.wait_for_log("consuming", 120)
            marker, kills, rounds = f"fsk-{uuid.uuid4().hex[:10]}", 0, 0
            expected: dict[int, str] = {}  # pid -> its arguments
            started = time.monotonic()
            next_kill = started + KILL_EVERY
            while time.monotonic() - started < KILL_PHASE:
                for pid, (i, code) in spawn_markers(10, f"{marker}-{rounds}").items():
                    expected[pid] = f"/bin/sh -c exit {code} {marker}-{rounds}-{i}"
                rounds += 1
                if time.monotonic() >= next_kill:
                    victim = kills % 2
                    ings[victim].stop(signal.SIGKILL)
                    assert ings[victim].returncode == -signal.SIGKILL
                    ings[victim] = ingester(kafka_broker.bootstrap, server.url, prefix, group, logs[victim], *args)
                    ings[victim].start()
                    kills += 1
                    next_kill += KILL_EVERY
                await asyncio.sleep(0.2)
            agent.stop()
            assert agent.returncode == 0, agent.log_text()[-3000:]
            await wait_ingested(kafka_broker.bootstrap, prefix, within=180)
            for ing in ings:
                ing.stop()
                assert ing.returncode == 0, ing.log_text()[-3000:]
        finally:
            agent.stop()
            for ing in ings:
                ing.stop()
        execs, exits, loss = http_queries(server.url, *marker_queries(marker), LOSS)
        assert len(execs) == len(expected), f"{len(execs)} exec rows for {len(expected)} marker processes"
        assert {int(pid): args for pid, args, _ in execs} == expected
        assert sorted(int(p) for p, _ in exits) == sorted(expected)
        totals = loss_totals(loss)
        assert_nothing_lost(totals)
        restarts = sum(log.read_text().count("consuming ") for log in logs) - 2
    print(f"\n{len(expected)} marker processes, {kills} SIGKILLs of an ingester in {KILL_PHASE:.0f}s "
          f"({restarts} restarts joined the group): every row once; pipeline_loss {totals}")  # fmt: skip
    assert kills >= KILL_PHASE / KILL_EVERY - 2


@pytest.mark.root
async def test_clickhouse_unreachable_then_restarted_with_the_real_dsn(
    kafka_broker, bpf_objects, tmp_path: Path
) -> None:
    prefix = group = f"noch-{uuid.uuid4().hex[:8]}"
    topics = [f"{prefix}.{stream}.v1" for stream in ("process_exec", "process_exit", "pipeline_stats")]
    for topic in topics:
        kafka_broker.create_topic(topic, partitions=4)
    with ServeSql(tmp_path / "store", tmp_path / "serve.log") as server:
        agent, agent_port = start_agent(kafka_broker.bootstrap, bpf_objects, prefix, tmp_path, f"n-{prefix}")
        closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
        ing = ingester(kafka_broker.bootstrap, closed, prefix, group, tmp_path / "ingest-closed.log",
                       "--health-listen", "127.0.0.1:0")  # fmt: skip
        try:
            with ing:
                port = health_port(ing)
                marker = f"fsu-{uuid.uuid4().hex[:10]}"
                expected = spawn_markers(100, marker)
                ing.wait_for_log("clickhouse failed", 30)
                status, text = http_get(port, "/healthz")
                assert status == 503 and "clickhouse unreachable" in text, text
                status, text = http_get(port, "/metrics")
                assert sample(text, "fleetscope_ingester_ready") == 0
                assert sample(text, "fleetscope_ingester_clickhouse_retries_total") >= 1

                # the agent shipped the markers meanwhile; the group committed nothing
                def shipped() -> float:
                    _, text = http_get(agent_port, "/metrics")
                    return sample(text, "fleetscope_agent_rows_shipped_total", stream="process_exec")

                wait_until(lambda: shipped() >= 100, 30, "the agent shipping the markers' exec rows")
                _, text = http_get(agent_port, "/metrics")
                assert sample(text, "fleetscope_agent_kernel_emitted_total", stream="process_exec") >= shipped()
                await asyncio.sleep(3)
                assert await committed_offsets(kafka_broker.bootstrap, group, topics) == {}
                t0 = time.monotonic()
                ing.stop()
                assert ing.returncode == 0 and time.monotonic() - t0 < 15, "a stop while retrying must be prompt"
            second = ingester(kafka_broker.bootstrap, server.url, prefix, group, tmp_path / "ingest-real.log",
                              "--health-listen", "127.0.0.1:0")  # fmt: skip
            with second:
                port = health_port(second)
                second.wait_for_log("consuming", 60)
                more = spawn_markers(100, marker + "-after")
                agent.stop()
                assert agent.returncode == 0, agent.log_text()[-3000:]
                await wait_ingested(kafka_broker.bootstrap, prefix, within=90)
                assert http_get(port, "/healthz") == (200, "ready\n")
                second.stop()
                assert second.returncode == 0, second.log_text()[-3000:]
        finally:
            agent.stop()
        totals = check_store(server.url, marker, expected)
        execs, exits = http_queries(server.url, *marker_queries(marker + "-after"))
        assert_markers_stored_once(execs, exits, marker + "-after", more)
    print(f"\nClickHouse unreachable: 0 offsets committed meanwhile; after the restart 200 marker "
          f"processes stored once; pipeline_loss {totals}")  # fmt: skip


async def committed_offsets(bootstrap: str, group: str, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for tp in (TopicPartition(t, p) for t in topics for p in range(4)):
            committed = await consumer.committed(tp)
            if committed is not None:
                out[tp] = committed
        return out
    finally:
        await consumer.stop()


# --- one ingester cut off from ClickHouse while another still reaches it ----------------------


async def test_cut_off_ingester_pauses_then_gives_its_partitions_away(kafka_broker, tmp_path: Path) -> None:
    """Ingester A reaches the store through a proxy the test cuts: A stops committing, pauses
    fetching at its in-flight bound, reports degraded health, and after max_poll_interval
    leaves the group so B stores A's partitions too; restored, A rejoins by itself."""
    prefix, group = f"fs{uuid.uuid4().hex[:8]}", f"cut-{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}.process_exit.v1"
    kafka_broker.create_topic(topic, partitions=4)
    node, rows = f"c{uuid.uuid4().hex[:6]}", 200
    with ServeSql(tmp_path / "store", tmp_path / "serve.log") as server:
        proxy = CutProxy(server.port).__enter__()
        extra = ("--health-listen", "127.0.0.1:0", "--max-poll-interval", "8s", "--max-in-flight-bytes", "32KiB",
                 "--max-poll-records", "4")  # fmt: skip
        a = ingester(kafka_broker.bootstrap, proxy.url, prefix, group, tmp_path / "a.log", *extra)
        b = ingester(kafka_broker.bootstrap, server.url, prefix, group, tmp_path / "b.log", *extra)
        try:
            with a, b:
                port_a, port_b = health_port(a), health_port(b)
                a.wait_for_log("consuming", 120)
                b.wait_for_log("consuming", 120)
                await wait_async(lambda: shared(port_a, port_b), True, 60, "A and B sharing the partitions")
                proxy.cut()  # A cannot reach ClickHouse any more
                producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
                await producer.start()
                try:
                    for seq in range(1, 81):  # ~5 KB each, round-robin: 40 land in A's partitions
                        await producer.send(topic, exit_batch(node, seq, rows), key=None, partition=seq % 4)
                    await producer.flush()
                finally:
                    await producer.stop()
                a.wait_for_log("insert of", 30)
                a.wait_for_log("fetching paused", 30)
                status, text = http_get(port_a, "/healthz")
                assert status == 503 and "clickhouse inserts failing" in text, text
                _, text = http_get(port_a, "/metrics")
                assert sample(text, "fleetscope_ingester_partitions_paused") == await partitions_of(port_a) > 0
                assert sample(text, "fleetscope_ingester_in_flight_bytes") < (32 << 10) + 4 * 6000
                a.wait_for_log("leaving the group", 30)  # after max_poll_interval (8 s) of failing inserts
                await wait_async(lambda: asyncio.to_thread(stored_rows, server.url, node), 80 * rows, 60,
                                 "B storing every batch, A's partitions included")  # fmt: skip
                await wait_async(lambda: group_lag(kafka_broker.bootstrap, group, [topic]), 0, 30, "all committed")
                status, text = http_get(port_a, "/healthz")
                assert status == 503 and "partitions given to other members" in text, text
                proxy.restore()  # A reaches it again
                a.wait_for_log("rejoining group", 30)
                await wait_async(lambda: shared(port_a, port_b), True, 60, "A owning partitions again")
                assert http_get(port_a, "/healthz") == (200, "ready\n")
                _, text = http_get(port_a, "/metrics")
                assert sample(text, "fleetscope_ingester_releases_total") == 1
                assert sample(text, "fleetscope_ingester_pauses_total") >= 1
                a.stop()
                b.stop()
            assert (a.returncode, b.returncode) == (0, 0), a.log_text()[-3000:]
        finally:
            proxy.__exit__()
        c = client(server.url)
        counts = c.query(f"SELECT count(), uniqExact(pid) FROM fleet.process_exit WHERE node = '{node}'").result_rows
        assert counts == [(80 * rows, 80 * rows)]
        assert c.command(f"SELECT count() FROM fleet.batches WHERE node = '{node}'") == 80


async def shared(port_a: int, port_b: int) -> bool:
    """Whether both members own partitions and none is left out (all topics: 4 partitions each)."""
    a, b = await partitions_of(port_a), await partitions_of(port_b)
    return a > 0 and b > 0 and a + b == 4 * len(SCHEMAS)


async def partitions_of(port: int) -> int:
    _, text = await asyncio.to_thread(http_get, port, "/metrics")
    return int(sample(text, "fleetscope_ingester_partitions_assigned"))
