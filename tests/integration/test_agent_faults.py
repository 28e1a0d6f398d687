"""Agent-side faults, end to end: a real agent on real kernel events (marker processes),
a real Kafka broker, a real ingester into the embedded ClickHouse engine.

1. The broker is stopped for 60 s while the agent runs and processes start, then restarted
   on the same log directory: every event is stored once, nothing is counted as lost.
2. The agent is SIGKILLed with a non-empty spool and restarted: the batches of the killed
   agent's epoch arrive, once.
5. The spool overflows (a tiny spool_max_bytes, no broker, a process storm): the loss is
   counted exactly, as spool_evicted, in fleet.pipeline_stats, fleet.pipeline_loss, the
   agent's /status and its log; memory stays bounded meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from node_agent.loader import cgroup2_mount
from tests.integration.conftest import kafka_libs_dir
from tests.support.kafka_broker import KafkaBroker, find_java, has_kafka_jars
from tests.support.procs import FleetscopeProcess, spawn_markers
from tests.support.real import require_real

pytestmark = [pytest.mark.root, pytest.mark.kafka, pytest.mark.integration]

OUTAGE_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_address() -> str:
    """A loopback address where no broker listens (connection refused)."""
    return f"127.0.0.1:{free_port()}"


_QUERIES = """
import json, sys
from fleetscope.store import connect
client = connect("chdb://" + sys.argv[1])
print(json.dumps([client.query(q).result_rows for q in json.load(sys.stdin)], default=str))
"""


def queries(store: Path, *sqls: str) -> list[list[list[Any]]]:
    """Rows of each query, from one process that opens the store once (the engine takes
    seconds to start, and a store has one opener at a time)."""
    out = subprocess.run(
        [sys.executable, "-c", _QUERIES, str(store)], input=json.dumps(sqls),
        capture_output=True, text=True, timeout=180, check=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    return [[list(r) for r in rows] for rows in json.loads(out.stdout)]


def status(port: int) -> dict[str, Any]:
    # generous: the agent answers between drains, and a storm may starve it of CPU for a while
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30) as resp:
        return dict(json.load(resp))


def wait_status(port: int, agent: FleetscopeProcess, ok: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert agent.proc is not None and agent.proc.poll() is None, agent.log_text()[-3000:]
        try:
            doc = status(port)
        except OSError:
            doc = {}
        if doc and ok(doc):
            return doc
        time.sleep(0.2)
    raise AssertionError(f"agent never reached: {what}; last status {doc}\n{agent.log_text()[-3000:]}")


def rss_kib(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1])


def agent_process(bootstrap: str, bpf: Path, prefix: str, spool: Path, port: int, log: Path,
                  *extra: str) -> FleetscopeProcess:  # fmt: skip
    return FleetscopeProcess(
        "agent", "--brokers", bootstrap, "--bpf-dir", str(bpf), "--topic-prefix", prefix, "--spool-dir", str(spool),
        "--status-listen", f"127.0.0.1:{port}", "--stats-interval", "1s", "--batch-max-age", "500ms", *extra,
        log=log,
    )  # fmt: skip


def ingest_process(bootstrap: str, store: Path, prefix: str, log: Path) -> FleetscopeProcess:
    return FleetscopeProcess(
        "ingest", "--brokers", bootstrap, "--clickhouse", f"chdb://{store}", "--group-id", prefix,
        "--topic-prefix", prefix, "--stats-interval", "1s", log=log,
    )  # fmt: skip


async def wait_ingested(bootstrap: str, prefix: str, within: float = 90) -> None:
    """Until the ingester's group committed everything in the prefix's topics."""
    lister = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await lister.start()
    try:
        topics = sorted(t for t in await lister.topics() if t.startswith(prefix + "."))
    finally:
        await lister.stop()
    assert topics, f"no topics {prefix}.*"
    probe = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None)
    group = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=prefix, enable_auto_commit=False)
    await probe.start()
    await group.start()
    try:
        parts = [TopicPartition(t, p) for t in topics for p in sorted(probe.partitions_for_topic(t) or ())]
        assert parts, topics
        ends = await probe.end_offsets(parts)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            behind = {tp: end for tp, end in ends.items() if end and ((await group.committed(tp)) or 0) < end}
            if not behind:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"the ingester did not commit {behind} within {within}s")
    finally:
        await probe.stop()
        await group.stop()


MARKER_EXECS = "SELECT pid, args, time FROM fleet.process_exec WHERE position(args, '{m}') > 0"
MARKER_EXITS = (
    "SELECT x.pid, x.exit_code FROM fleet.process_exit AS x INNER JOIN (SELECT pid, time FROM fleet.process_exec "
    "WHERE position(args, '{m}') > 0) AS e ON x.pid = e.pid WHERE x.time >= e.time AND x.ppid = {me}"
)
LOSS = (
    "SELECT stream, sum(kernel_emitted), sum(kernel_dropped), sum(agent_dropped), sum(stored), sum(sequence_gaps), "
    "sum(duplicates), sum(spool_evicted) FROM fleet.pipeline_loss GROUP BY stream"
)


def marker_queries(marker: str) -> tuple[str, str]:
    return MARKER_EXECS.format(m=marker), MARKER_EXITS.format(m=marker, me=os.getpid())


def assert_markers_stored_once(execs: list[list[Any]], exits: list[list[Any]], marker: str,
                               expected: dict[int, tuple[int, int]]) -> None:  # fmt: skip
    """One exec row and one exit row per marker process, with its arguments and exit code
    (rows of marker_queries(marker), narrowed to this marker's own arguments)."""
    execs = [r for r in execs if r[1].endswith(tuple(f" {marker}-{i}" for i, _ in expected.values()))]
    assert len(execs) == len(expected), f"{len(execs)} exec rows for {len(expected)} marker processes"
    assert {int(pid): args for pid, args, _ in execs} == {
        pid: f"/bin/sh -c exit {code} {marker}-{i}" for pid, (i, code) in expected.items()
    }
    mine = [r for r in exits if int(r[0]) in expected]
    assert len(mine) == len(expected)
    assert {int(p): int(c) for p, c in mine} == {pid: code for pid, (_, code) in expected.items()}


def loss_totals(rows: list[list[Any]]) -> dict[str, list[int]]:
    """LOSS rows per stream: emitted, kernel dropped, agent dropped, stored, gaps,
    duplicates, spool evicted."""
    return {r[0]: [int(v) for v in r[1:]] for r in rows}


def assert_nothing_lost(totals: dict[str, list[int]]) -> None:
    assert {"process_exec", "process_exit", "pipeline_stats"} <= set(totals), totals
    for stream, (emitted, dropped, agent_dropped, stored, gaps, dups, evicted) in totals.items():
        assert gaps == dups == agent_dropped == evicted == 0, (stream, totals)
        if stream in ("process_exec", "process_exit"):
            assert emitted == dropped + stored, (stream, totals)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A broker of this test alone, which it may stop and start."""
    if find_java() is None or not has_kafka_jars(kafka_libs_dir()):
        require_real("Kafka broker: no java or no Kafka jars; run `make test`")
    broker = KafkaBroker(tmp_path / "kafka", kafka_libs_dir(), num_partitions=1)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_broker_stopped_for_a_minute(own_broker: KafkaBroker, bpf_objects: Path, tmp_path: Path) -> None:
    store, prefix, port = tmp_path / "store", f"outage-{uuid.uuid4().hex[:8]}", free_port()
    marker = f"fsout-{uuid.uuid4().hex[:12]}"
    ingest = ingest_process(own_broker.bootstrap, store, prefix, tmp_path / "ingest.log")
    agent = agent_process(own_broker.bootstrap, bpf_objects, prefix, tmp_path / "spool", port, tmp_path / "agent.log")
    with ingest, agent:
        agent.wait_for_log("probe process running", 120)
        agent.wait_for_log("connected to kafka", 60)
        ingest.wait_for_log("consuming", 120)
        expected = spawn_markers(100, marker)  # before
        stopped = time.monotonic()
        own_broker.stop()
        try:
            during = spawn_markers(300, f"{marker}-b")
            wait_status(port, agent, lambda d: d["spool"]["batches"] > 0 and not d["spool"]["connected"], 45,
                        "batches spooled while the broker is away")  # fmt: skip
            time.sleep(max(0.0, stopped + OUTAGE_SECONDS - time.monotonic()))
        finally:
            own_broker.start()  # same port, same log directory
        after = spawn_markers(100, f"{marker}-c")
        wait_status(port, agent, lambda d: d["spool"]["batches"] == 0 and d["spool"]["connected"], 60,
                    "the spool delivered")  # fmt: skip
        agent.stop()
        asyncio.run(wait_ingested(own_broker.bootstrap, prefix))
        ingest.stop()
    assert agent.returncode == 0 and ingest.returncode == 0, agent.log_text()[-3000:]
    assert "batches are spooled" in agent.log_text()
    execs, exits, loss = queries(store, *marker_queries(marker), LOSS)
    # the markers of before, during and after the outage (-b-, -c- in their arguments)
    assert_markers_stored_once(execs, exits, marker, expected)
    assert_markers_stored_once(execs, exits, f"{marker}-b", during)
    assert_markers_stored_once(execs, exits, f"{marker}-c", after)
    assert len(execs) == len(expected) + len(during) + len(after)
    assert_nothing_lost(loss_totals(loss))


def test_agent_killed_with_a_full_spool(kafka_broker: KafkaBroker, bpf_objects: Path, tmp_path: Path) -> None:
    store, prefix, spool = tmp_path / "store", f"killed-{uuid.uuid4().hex[:8]}", tmp_path / "spool"
    marker = f"fskill-{uuid.uuid4().hex[:12]}"
    port = free_port()
    # the first agent has no broker: every batch waits in its spool
    first = agent_process(dead_address(), bpf_objects, prefix, spool, port, tmp_path / "agent1.log")
    with first:
        first.wait_for_log("probe process running", 120)
        expected = spawn_markers(300, marker)
        # every marker row read and cut into a batch, so appended to the spool: the agent reads
        # the host's other processes too, so wait for what the kernel had emitted by now
        # (emitted counts drops too, see fleet.pipeline_loss)
        now = status(port)["streams"]
        made = {s: now[s]["kernel_emitted"] - now[s]["kernel_dropped"] for s in ("process_exec", "process_exit")}

        def spooled(d: dict[str, Any]) -> bool:
            return all(d["streams"][s]["records_read"] - d["streams"][s]["rows_batching"] >= n for s, n in made.items())

        doc = wait_status(port, first, spooled, 60, "the marker rows spooled")
        assert doc["spool"]["batches"] > 0 and doc["spool"]["connected"] is False
        first.stop(signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    ingest = ingest_process(kafka_broker.bootstrap, store, prefix, tmp_path / "ingest.log")
    second = agent_process(kafka_broker.bootstrap, bpf_objects, prefix, spool, port, tmp_path / "agent2.log")
    with ingest, second:
        second.wait_for_log("not yet delivered; sending them first", 120)
        ingest.wait_for_log("consuming", 120)
        wait_status(port, second, lambda d: d["spool"]["batches"] == 0, 60, "the spool delivered")
        second.stop()
        asyncio.run(wait_ingested(kafka_broker.bootstrap, prefix))
        ingest.stop()
    assert second.returncode == 0 and ingest.returncode == 0
    execs, exits, epochs, loss = queries(
        store, *marker_queries(marker), "SELECT epoch, count() FROM fleet.batches GROUP BY epoch", LOSS
    )
    assert_markers_stored_once(execs, exits, marker, expected)
    assert len(epochs) == 2, epochs  # the killed agent's batches and the new one's
    totals = loss_totals(loss)
    for stream, (_, _, agent_dropped, _, gaps, dups, evicted) in totals.items():
        assert gaps == dups == agent_dropped == evicted == 0, (stream, totals)


@pytest.fixture
def storm_cgroup() -> Iterator[Path]:
    path = cgroup2_mount() / f"fleetscope-spool-{uuid.uuid4().hex[:8]}.slice"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


STORM = 1500
SPOOL_MAX = 64 << 10  # the agent spools LZ4 frames: the storm takes about 90 KiB
BATCH_MAX = 16 << 10
BATCH_ROWS = 100  # exit rows compress to a few bytes: many batches of both streams, interleaved in the spool


def test_spool_overflow_is_counted_exactly(
    kafka_broker: KafkaBroker, bpf_objects: Path, storm_cgroup: Path, tmp_path: Path
) -> None:
    store, prefix, spool = tmp_path / "store", f"overflow-{uuid.uuid4().hex[:8]}", tmp_path / "spool"
    port = free_port()
    limits = ("--filter-cgroup", str(storm_cgroup), "--spool-max-bytes", str(SPOOL_MAX),
              "--batch-max-bytes", str(BATCH_MAX), "--batch-max-rows", str(BATCH_ROWS))  # fmt: skip
    first = agent_process(dead_address(), bpf_objects, prefix, spool, port, tmp_path / "agent1.log", *limits)
    with first:
        first.wait_for_log("probe process running", 120)
        assert first.proc is not None
        rss_before = rss_kib(first.proc.pid)
        script = (f"echo $$ > {storm_cgroup}/cgroup.procs; i=0; "
                  f"while [ $i -lt {STORM} ]; do /bin/sh -c 'exit 0' storm-$i; i=$((i+1)); done")  # fmt: skip
        storm = subprocess.Popen(["/bin/sh", "-c", script])
        peak_in_flight = peak_bytes = peak_rss = 0
        while storm.poll() is None:  # backpressure: what the agent holds while the broker is away
            doc = status(port)
            peak_in_flight = max(peak_in_flight, doc["spool"]["in_flight"])
            peak_bytes = max(peak_bytes, doc["spool"]["bytes"])
            peak_rss = max(peak_rss, rss_kib(first.proc.pid))
            time.sleep(0.05)
        assert storm.wait() == 0
        wait_status(port, first, lambda d: d["streams"].get("process_exit", {}).get("records_read", 0) > STORM,
                    30, "the storm read")  # fmt: skip
        time.sleep(1.0)  # > batch_max_age: every row is in a batch, spooled or evicted
        doc = status(port)
        assert doc["streams"]["process_exec"].get("rows_spool_evicted", 0) > 0, doc
        assert doc["spool"]["bytes"] <= SPOOL_MAX and doc["spool"]["evicting"], doc
        code, text = healthz(port)
        assert code == 503 and "spool full" in text, text
        first.stop()  # SIGTERM: its last counters go to the spool too
    log = first.log_text()
    assert first.returncode == 0, log[-3000:]
    assert "spool full" in log and "unsent batches lost" in log and "stay in the spool" in log
    assert peak_in_flight == 0  # no producer: nothing leaves the spool, nothing piles up in memory
    assert peak_bytes <= SPOOL_MAX
    print(f"agent RSS {rss_before} KiB before the storm, at most {peak_rss} KiB during it")
    assert peak_rss - rss_before < 64 << 10, (rss_before, peak_rss)

    ingest = ingest_process(kafka_broker.bootstrap, store, prefix, tmp_path / "ingest.log")
    second = agent_process(kafka_broker.bootstrap, bpf_objects, prefix, spool, port, tmp_path / "agent2.log", *limits)
    with ingest, second:
        second.wait_for_log("not yet delivered; sending them first", 120)
        ingest.wait_for_log("consuming", 120)
        wait_status(port, second, lambda d: d["spool"]["batches"] == 0, 60, "the spool delivered")
        second.stop()
        asyncio.run(wait_ingested(kafka_broker.bootstrap, prefix))
        ingest.stop()
    assert second.returncode == 0 and ingest.returncode == 0
    loss, evicted, stored_storm = queries(
        store, LOSS,
        "SELECT stream, sum(value) FROM fleet.pipeline_stats WHERE counter = 'batches_spool_evicted' GROUP BY stream",
        "SELECT count(), uniqExact(args) FROM fleet.process_exec WHERE args LIKE '%storm-%'",
    )  # fmt: skip
    totals = loss_totals(loss)
    evicted_batches = {stream: int(n) for stream, n in evicted}
    print("pipeline_loss after the overflow:", totals, "evicted batches:", evicted_batches)
    for stream, events in (("process_exec", STORM), ("process_exit", STORM + 1)):  # + the spawner's exit
        emitted, dropped, agent_dropped, stored, gaps, dups, evicted = totals[stream]
        assert evicted > 0 and agent_dropped == evicted and dups == 0, (stream, totals)
        assert emitted == events and dropped == 0, (stream, totals)
        assert stored + evicted == events, (stream, totals)
        assert gaps == evicted_batches[stream], (stream, totals, evicted_batches)
    assert [int(v) for v in stored_storm[0]] == [totals["process_exec"][3]] * 2
    # the counters that explain the loss were not lost with it
    assert totals["pipeline_stats"][2] == totals["pipeline_stats"][4] == 0, totals


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
