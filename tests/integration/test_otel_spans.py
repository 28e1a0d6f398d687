"""Spans from real kernel activity, end to end: loopback TCP connections this test makes
become exactly one CLIENT and one SERVER span each (peers, byte counts, owners) through
`fleetscope run`, exported by the OpenTelemetry SDK over OTLP/HTTP to a receiver decoding
with opentelemetry-proto, and the same spans land in fleet.otel_traces; the pipeline's own
spans continue the agent's trace in the ingester, through the in-memory hand-over and
through Kafka (decode, enrich, insert, spans, commit)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_agent.loader import cgroup2_mount
from tests.integration.test_tcp_connections import Exchange, run_exchanges, running_server
from tests.support.otlp_receiver import ReceivedSpan, attributes, otlp_receiver
from tests.support.procs import FleetscopeProcess, spawn_markers
from tests.support.real import require_real

pytestmark = [pytest.mark.root, pytest.mark.integration]

N = 20
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "200"}  # the SDK's batch processor: export every 200 ms


@dataclass(frozen=True)
class Pod:
    """A kubelet-shaped cgroup (systemd driver, containerd): pod slice and container scope."""

    uid: str
    container_id: str
    path: Path


@pytest.fixture
def pods() -> Iterator[tuple[Pod, Pod]]:
    """Two pods' container cgroups under the cgroup2 mount, client and server; this process
    moves into the client one for the test (its connects are the client side)."""
    root = cgroup2_mount()
    if not (root / "cgroup.procs").exists():
        require_real("no cgroup v2 mount for kubelet-shaped cgroups")
    home = root / next(
        line.split("::", 1)[1] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")
    ).lstrip("/")
    top = root / f"fleetscope-otel-{uuid.uuid4().hex[:8]}.slice"
    made = []
    for _ in range(2):
        uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
        leaf = top / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice" / f"cri-containerd-{cid}.scope"
        leaf.mkdir(parents=True)
        made.append(Pod(uid, cid, leaf))
    try:
        (made[0].path / "cgroup.procs").write_text(str(os.getpid()))
        yield made[0], made[1]
    finally:
        (home / "cgroup.procs").write_text(str(os.getpid()))
        for pod in made:
            pod.path.rmdir()
            pod.path.parent.rmdir()
        top.rmdir()


def query(data_dir: Path, sql: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "fleetscope", "query", "--data-dir", str(data_dir), "--format", "json", sql],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


def connection_spans(spans: list[ReceivedSpan], ports: set[int]) -> list[ReceivedSpan]:
    return [s for s in spans if s.name.startswith("tcp ") and s.attributes.get("server.port") in ports]


def continued(spans: list[ReceivedSpan], stream: str) -> list[tuple[ReceivedSpan, ReceivedSpan]]:
    """(agent send span, ingester span continuing it) of each traced batch of `stream` received."""
    sends = {s.span_id: s for s in spans if s.name == f"send {stream}" and s.kind == "producer"}
    return [(sends[s.parent_span_id], s) for s in spans if s.kind == "consumer" and s.parent_span_id in sends]


def handed_over(spans: list[ReceivedSpan], stream: str, stages: list[str]) -> bool:
    """Some batch of `stream` went through all the stages, its spans all received."""
    stages = sorted(stages)
    return any(sorted(c.name for c in spans if c.parent_span_id == consumer.span_id) == stages
               for _, consumer in continued(spans, stream))  # fmt: skip


def assert_pipeline_trace(spans: list[ReceivedSpan], stream: str, stages: list[str]) -> None:
    """Some batch of `stream` has the agent's send span, the ingester's span as its child in
    the same trace, and the stages as children of that; every continued batch is in one trace
    and its stages are among those (a batch the stop caught may not have reached them all)."""
    pairs = continued(spans, stream)
    assert pairs, f"no ingester span continues an agent span of {stream}"
    assert handed_over(spans, stream, stages), f"no batch of {stream} has all of {stages}"
    for send, consumer in pairs:
        assert consumer.trace_id == send.trace_id
        assert send.resource["service.name"] == "fleetscope-agent"
        assert consumer.resource["service.name"] == "fleetscope-ingester"
        assert send.attributes["fleetscope.batch_id"] == consumer.attributes["fleetscope.batch_id"]
        children = [s for s in spans if s.parent_span_id == consumer.span_id]
        assert {c.name for c in children} <= set(stages), children
        assert all(c.trace_id == send.trace_id for c in children)
        assert send.span.start_time_unix_nano <= consumer.span.start_time_unix_nano


def test_tcp_connections_become_spans_through_fleetscope_run(bpf_objects, pods, tmp_path: Path) -> None:
    client_pod, server_pod = pods
    data_dir = tmp_path / "store"
    me, comm = os.getpid(), Path("/proc/self/comm").read_text().strip()
    with otlp_receiver() as receiver:
        run = FleetscopeProcess(
            "run",
            "--probes",
            "process,tcp_connections",
            "--data-dir",
            str(data_dir),
            "--bpf-dir",
            str(bpf_objects),
            "--status",
            "log",
            "--sql-listen",
            "off",
            "--node-name",
            "otel-node",
            "--batch-max-age",
            "200ms",
            "--otlp-protocol",
            "http/protobuf",
            "--trace-sample-ratio",
            "1.0",
            "--span-process-min-duration",
            "0",
            log=tmp_path / "run.log",
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, **FAST_EXPORT},
        )
        with run:
            run.wait_for_log("probe tcp_connections running", 120)
            with running_server(N, server_pod.path) as (server, v4, v6):
                exchanges = run_exchanges(N, v4, v6)
            got = receiver.wait_for(lambda s: len(connection_spans(s, {v4, v6})) >= 2 * N, 30)
            run.stop(signal.SIGINT)
        assert run.returncode == 0, run.log_text()[-3000:]
        got = list(receiver.spans)  # everything, after the final flush
    spans = connection_spans(got, {v4, v6})
    # an IPv4 and an IPv6 connection may get the same client port: the family is part of the key
    clients = {(s.attributes["network.type"], s.attributes["client.port"]): s for s in spans if s.kind == "client"}
    servers = {(s.attributes["network.type"], s.attributes["client.port"]): s for s in spans if s.kind == "server"}
    assert len(spans) == 2 * N and len(clients) == len(servers) == N
    for ex in exchanges:
        key = ("ipv4" if ex.family == 4 else "ipv6", ex.client_port)
        client, srv = clients[key], servers[key]
        assert_connection(client, srv, ex, me, comm, server.pid)
        # the agent resolved each end's cgroup: container and pod identity on the resource
        assert client.resource == {
            "service.name": comm,
            "host.name": "otel-node",
            "k8s.pod.uid": client_pod.uid,
            "container.id": client_pod.container_id,
        }
        assert (srv.resource["k8s.pod.uid"], srv.resource["container.id"]) == (server_pod.uid, server_pod.container_id)
    # the server process's lifetime is a process span (threshold 0)
    lifetimes = [s for s in got if s.name.startswith("process ") and s.attributes.get("process.pid") == server.pid]
    assert len(lifetimes) == 1 and lifetimes[0].attributes["process.exit.code"] == 0
    # the agent -> ingester hand-over of each traced batch continues the agent's trace
    assert_pipeline_trace(got, "tcp_connections", ["decode", "enrich", "insert", "spans"])
    # the same spans, ids and attributes in fleet.otel_traces
    rows = query(
        data_dir,
        f"SELECT TraceId, SpanId, SpanKind, SpanAttributes, ResourceAttributes FROM fleet.otel_traces "
        f"WHERE SpanAttributes['server.port'] IN ('{v4}', '{v6}')",
    )
    assert len(rows) == 2 * N
    stored = {r["SpanId"]: r for r in rows}
    for s in spans:
        r = stored[s.span_id]
        assert r["TraceId"] == s.trace_id and r["SpanKind"] == s.kind.capitalize()
        assert r["SpanAttributes"] == {k: str(v) for k, v in s.attributes.items()}
        assert r["ResourceAttributes"] == s.resource


def assert_connection(client: ReceivedSpan, server: ReceivedSpan, ex: Exchange, me: int, comm: str, srv: int) -> None:
    """One connection's two spans: peers, ports, byte counts both ways, owners, resource."""
    host = "127.0.0.1" if ex.family == 4 else "::1"
    net = "ipv4" if ex.family == 4 else "ipv6"
    c, s = client.attributes, server.attributes
    assert client.name == "tcp connect" and server.name == "tcp accept"
    assert (c["network.peer.address"], c["network.peer.port"], c["network.local.port"]) == (
        host,
        ex.server_port,
        ex.client_port,
    )
    assert (s["network.peer.address"], s["network.peer.port"], s["network.local.port"]) == (
        host,
        ex.client_port,
        ex.server_port,
    )
    for a in (c, s):
        assert (a["server.address"], a["server.port"], a["client.address"], a["client.port"]) == (
            host,
            ex.server_port,
            host,
            ex.client_port,
        )
        assert (a["network.transport"], a["network.type"]) == ("tcp", net)
    assert (c["fleetscope.tcp.bytes_sent"], c["fleetscope.tcp.bytes_received"]) == (ex.sent, ex.received)
    assert (s["fleetscope.tcp.bytes_sent"], s["fleetscope.tcp.bytes_received"]) == (ex.received, ex.sent)
    assert (c["process.pid"], c["process.executable.name"], s["process.pid"]) == (me, comm, srv)
    assert client.resource["host.name"] == server.resource["host.name"] == "otel-node"
    for span in (client, server):
        assert span.span.status.code == 0 and span.scope == "fleetscope"
        assert 0 < span.span.end_time_unix_nano - span.span.start_time_unix_nano < 10**10
    # the server's end starts when the handshake completes, after the client's SYN
    assert client.span.start_time_unix_nano <= server.span.start_time_unix_nano


SI_KERNEL, SEGV_MAPERR = 0x80, 1
SEGFAULT = "import ctypes\nctypes.string_at(0)\n"
FIGURES = ("total_vm_kb", "anon_rss_kb", "file_rss_kb", "shmem_rss_kb", "pgtables_kb", "oom_score_adj")


def test_kills_are_events_of_the_process_span_or_spans_of_their_own(bpf_objects, tmp_path: Path) -> None:
    """Through `fleetscope run` with the process, oom_kills and fatal_signals probes (the
    exit joined with the other two in the kernel) and a 3 s process threshold: a process that
    lived longer and died of SIGKILL, SIGSEGV or the OOM killer is ONE process span with a
    "process.signal" event naming the sender (and a "process.oom_kill" event with the
    figures of its oom_kills row); a short-lived one is a "signal <SIG>" span (and an "oom
    kill" span) instead. Nothing is reported twice."""
    from tests.support.memcg import HOG, memory_cgroup

    data_dir = tmp_path / "store"
    me = os.getpid()
    no_cores = "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    with otlp_receiver() as receiver, memory_cgroup(20 << 20) as memcg:
        run = FleetscopeProcess(
            "run", "--probes", "process,oom_kills,fatal_signals", "--data-dir", str(data_dir),
            "--bpf-dir", str(bpf_objects), "--status", "log", "--sql-listen", "off", "--node-name", "kill-node",
            "--batch-max-age", "200ms", "--otlp-protocol", "http/protobuf", "--span-process-min-duration", "3s",
            log=tmp_path / "run.log", env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, **FAST_EXPORT},
        )  # fmt: skip
        with run:
            run.wait_for_log("probe process running", 120)

            def hog(pause: float) -> subprocess.Popen[bytes]:
                joins = "; ".join(f'echo $$ > "{p}"' for p in memcg.procs)
                code = f"import time\ntime.sleep({pause})\n{HOG}"
                return subprocess.Popen(["sh", "-c", f'{joins}; exec "$0" -c "$1"', sys.executable, code])

            long_kill = subprocess.Popen(["sleep", "30"])
            long_segv = subprocess.Popen([sys.executable, "-c", f"{no_cores}import time\ntime.sleep(3.3)\n{SEGFAULT}"])
            # the short ones die within a Python start-up, far under the threshold even on a
            # loaded machine; the long ones live past it
            long_oom = hog(3.3)
            time.sleep(3.3)
            long_kill.kill()
            short_kill = subprocess.Popen(["sleep", "30"])
            short_kill.kill()
            short_segv = subprocess.Popen([sys.executable, "-c", no_cores + SEGFAULT])
            # one OOM at a time in the cgroup: else the short hog's allocation can be what
            # kills the long one (the sender of an OOM kill is the task that triggered it)
            assert long_oom.wait(60) == -9
            short_oom = hog(0)
            for p, code in ((long_kill, -9), (long_segv, -11), (long_oom, -9), (short_kill, -9), (short_segv, -11),
                            (short_oom, -9)):  # fmt: skip
                assert p.wait(60) == code
            pids = {p.pid for p in (long_kill, long_segv, long_oom, short_kill, short_segv, short_oom)}

            def ours(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
                return [s for s in spans if s.attributes.get("process.pid") in pids]

            receiver.wait_for(lambda s: len(ours(s)) >= 7, 30)
            run.stop(signal.SIGINT)
        assert run.returncode == 0, run.log_text()[-3000:]
        got = ours(list(receiver.spans))
    by_pid: dict[int, list[ReceivedSpan]] = {}
    for s in got:
        by_pid.setdefault(s.attributes["process.pid"], []).append(s)
    assert {pid: sorted(s.name.split()[0] for s in spans) for pid, spans in by_pid.items()} == {
        long_kill.pid: ["process"], long_segv.pid: ["process"], long_oom.pid: ["process"],
        short_kill.pid: ["signal"], short_segv.pid: ["signal"], short_oom.pid: ["oom", "signal"],
    }  # fmt: skip
    oom_rows = {
        r["pid"]: r
        for r in query(data_dir, f"SELECT * FROM fleet.oom_kills WHERE pid IN ({long_oom.pid}, {short_oom.pid})")
    }
    assert sorted(oom_rows) == sorted((long_oom.pid, short_oom.pid))

    def events(span: ReceivedSpan) -> dict[str, dict[str, object]]:
        return {e.name: attributes(e.attributes) for e in span.span.events}

    def sender(pid: int, code: int) -> dict[str, object]:
        return {"fleetscope.signal.sender.pid": pid, "fleetscope.signal.code": code}

    (span,) = by_pid[long_kill.pid]
    assert span.name == "process sleep" and list(events(span)) == ["process.signal"]
    assert events(span)["process.signal"].items() >= sender(me, 0).items()
    (span,) = by_pid[long_segv.pid]
    assert events(span)["process.signal"].items() >= sender(long_segv.pid, SEGV_MAPERR).items()
    (span,) = by_pid[long_oom.pid]
    assert list(events(span)) == ["process.signal", "process.oom_kill"]  # SIGKILL sent, then the victim marked
    assert events(span)["process.signal"].items() >= sender(long_oom.pid, SI_KERNEL).items()
    row = oom_rows[long_oom.pid]
    assert events(span)["process.oom_kill"] == {
        **{f"fleetscope.oom.{k}": int(row[k]) for k in FIGURES}, "fleetscope.oom.trigger.pid": long_oom.pid,
    }  # fmt: skip
    # the exit row itself, in fleet.process_exit (migration 0050), has the kill and the sender
    (x,) = query(
        data_dir, "SELECT oom_killed, oom_anon_rss_kb, oom_score_adj, signal_sender_known, signal_sender_pid, "
        f"signal_code FROM fleet.process_exit WHERE pid = {long_oom.pid}",
    )  # fmt: skip
    assert x == {"oom_killed": 1, "oom_anon_rss_kb": row["anon_rss_kb"], "oom_score_adj": row["oom_score_adj"],
                 "signal_sender_known": 1, "signal_sender_pid": long_oom.pid, "signal_code": SI_KERNEL}  # fmt: skip
    (span,) = by_pid[short_kill.pid]
    assert span.name == "signal SIGKILL" and span.attributes.items() >= sender(me, 0).items()
    (span,) = by_pid[short_segv.pid]
    assert span.name == "signal SIGSEGV" and span.attributes.items() >= sender(short_segv.pid, SEGV_MAPERR).items()
    kill = next(s for s in by_pid[short_oom.pid] if s.name == "oom kill")
    row = oom_rows[short_oom.pid]
    assert {k: kill.attributes[f"fleetscope.oom.{k}"] for k in FIGURES} == {k: int(row[k]) for k in FIGURES}
    # the kill's time, as its oom_kills row has it (the span is the instant of the kill; each
    # batch converts boot time to wall time on its own, which may differ by a few ns)
    stamp = query(data_dir, f"SELECT toUnixTimestamp64Nano(time) AS t FROM fleet.oom_kills WHERE pid = {short_oom.pid}")
    assert kill.span.start_time_unix_nano == kill.span.end_time_unix_nano
    assert abs(kill.span.start_time_unix_nano - int(stamp[0]["t"])) < 1_000_000
    # the same spans and events in fleet.otel_traces
    stored = query(
        data_dir, "SELECT SpanId, Events.Name AS events FROM fleet.otel_traces WHERE SpanAttributes['process.pid'] IN "
        f"({', '.join(map(str, pids))})",
    )  # fmt: skip
    assert {r["SpanId"]: r["events"] for r in stored} == {s.span_id: [e.name for e in s.span.events] for s in got}


STAGES = ["decode", "enrich", "insert", "commit"]


@pytest.mark.kafka
def test_batches_are_traced_from_agent_through_kafka_to_commit(kafka_broker, bpf_objects, tmp_path: Path) -> None:
    with otlp_receiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, **FAST_EXPORT}
        # own topics: rows of this test must not reach tests that read the default ones
        tracing = ("--otlp-protocol", "http/protobuf", "--trace-sample-ratio", "1.0", "--topic-prefix", "otel-trace")
        ingest = FleetscopeProcess(
            "ingest",
            "--brokers",
            kafka_broker.bootstrap,
            "--clickhouse",
            f"chdb://{tmp_path / 'store'}",
            "--group-id",
            "otel-trace-test",
            *tracing,
            log=tmp_path / "ingest.log",
            env=env,
        )
        agent = FleetscopeProcess(
            "agent",
            "--brokers",
            kafka_broker.bootstrap,
            "--bpf-dir",
            str(bpf_objects),
            "--batch-max-age",
            "200ms",
            *tracing,
            log=tmp_path / "agent.log",
            env=env,
        )
        with ingest, agent:
            agent.wait_for_log("probe process running", 60)
            ingest.wait_for_log("consuming", 120)
            spawn_markers(5, "otel-trace")

            # what is asserted below: a process_exec batch traced from the agent's send to the commit
            receiver.wait_for(lambda s: handed_over(s, "process_exec", STAGES), 60)
            agent.stop()
            ingest.stop()
        assert agent.returncode == 0 and ingest.returncode == 0
        got = list(receiver.spans)
    assert_pipeline_trace(got, "process_exec", STAGES)
    consumer = next(s for s in got if s.kind == "consumer" and s.name == "process otel-trace.process_exec.v1")
    assert consumer.attributes["messaging.system"] == "kafka"
    send = next(s for s in got if s.span_id == consumer.parent_span_id)
    assert send.attributes["messaging.destination.name"] == "otel-trace.process_exec.v1"
