"""Kernel-derived spans: exact spans and attributes from decoded batches, through the real
OpenTelemetry SDK OTLP exporters (HTTP/protobuf and gRPC) into a receiver that decodes
with opentelemetry-proto, and into fleet.otel_traces on the embedded ClickHouse engine."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fleetscope import native
from fleetscope.codec import SCHEMAS, DecodedBatch, StringColumn, decode_batch, encode_batch, encode_strings
from fleetscope.otel import span_exporter
from fleetscope.store import connect, migrate
from fleetscope.v1 import batch_pb2
from ingester import spans as spans_mod
from ingester.load import BatchLoader
from ingester.spans import SpanOptions, build
from ingester.traces import SpanWriter, readable_spans
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, attributes, otlp_receiver

T0 = time.time_ns() // 10**9 * 10**9  # recent: older rows would fall to the tables' 30-day TTL
OPTS = SpanOptions(process_min_duration_ns=1_000_000_000)


def addr(text: str) -> np.ndarray:
    """An address as the wire's 4 fixed32 (16 bytes, IPv4 v4-mapped)."""
    raw = socket.inet_pton(socket.AF_INET6, text if ":" in text else f"::ffff:{text}")
    return np.frombuffer(raw, "<u4")


def make_batch(
    stream: str, rows: list[dict[str, Any]], batch_id: str = "m1-x-1-1", node: str = "node-a"
) -> DecodedBatch:
    """Encode rows with the stream's schema (as the agent would), then decode them."""
    schema = SCHEMAS[stream]
    n = len(rows)
    cols: dict[str, Any] = {}
    for c in schema.columns:
        if c.omittable:
            continue
        if c.dtype is None:
            cols[c.name] = np.array([r.get(c.name, "").encode() for r in rows], dtype="S64")
        elif c.per_row > 1:
            cols[c.name] = np.array([r[c.name] for r in rows], c.dtype).reshape(n, c.per_row)
        else:
            cols[c.name] = np.array([r.get(c.name, 0) for r in rows], c.dtype)
    header = batch_pb2.BatchHeader(
        node=batch_pb2.NodeIdentity(host_name=node, machine_id="m1"),
        batch_id=batch_id,
        stream=stream,
        epoch=1,
        sequence=1,
        created_ns=T0,
        row_count=n,
    )
    return decode_batch(schema, encode_batch(schema, header, cols))


CONN = dict(duration_ns=0, handshake_ns=0, cgroup_id=77, netns=4026531840, srtt_us=0, retransmits=0)
TCP_ROWS = [
    # a successful IPv4 connect and its accept on the same node (local/remote swapped)
    {
        **CONN,
        "time": T0,
        "duration_ns": 5_000_000,
        "handshake_ns": 40_000,
        "pid": 100,
        "comm": "curl",
        "owner_known": 1,
        "role": "connect",
        "family": 4,
        "local_addr": addr("127.0.0.1"),
        "local_port": 40000,
        "remote_addr": addr("127.0.0.1"),
        "remote_port": 8080,
        "bytes_sent": 120,
        "bytes_received": 3000,
        "srtt_us": 35,
        "retransmits": 1,
    },
    {
        **CONN,
        "time": T0 + 50_000,
        "duration_ns": 4_900_000,
        "pid": 200,
        "comm": "nginx",
        "owner_known": 1,
        "role": "accept",
        "family": 4,
        "local_addr": addr("127.0.0.1"),
        "local_port": 8080,
        "remote_addr": addr("127.0.0.1"),
        "remote_port": 40000,
        "bytes_sent": 3000,
        "bytes_received": 120,
    },
    # a refused IPv6 connect
    {
        **CONN,
        "time": T0 + 1000,
        "duration_ns": 20_000,
        "pid": 101,
        "comm": "curl",
        "owner_known": 1,
        "role": "connect",
        "family": 6,
        "local_addr": addr("::1"),
        "local_port": 40001,
        "remote_addr": addr("::1"),
        "remote_port": 9,
        "failed": 1,
        "error": "ECONNREFUSED",
        "reset": "received",
    },
    # an accepted socket whose owner was never seen
    {
        **CONN,
        "time": T0 + 2000,
        "duration_ns": 10_000,
        "pid": 0,
        "comm": "",
        "owner_known": 0,
        "role": "accept",
        "family": 6,
        "local_addr": addr("2001:db8::2"),
        "local_port": 443,
        "remote_addr": addr("2001:db8::1"),
        "remote_port": 50000,
    },
]


def otlp_of(spans: list[ReceivedSpan], kind: str, port_attr: str, port: int) -> ReceivedSpan:
    found = [s for s in spans if s.kind == kind and s.attributes.get(port_attr) == port]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def loader(tmp_path: Any) -> Iterator[BatchLoader]:
    client = connect(f"chdb://{tmp_path / 'ch'}")
    migrate(client)
    loader = BatchLoader(client)
    yield loader
    loader.close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as r:
        yield r


def export_http(
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    loader: BatchLoader,
    *batches: tuple[DecodedBatch, dict[str, Any] | None],
) -> list[ReceivedSpan]:
    """Write and export the batches' spans with the SDK's OTLP/HTTP exporter, configured by
    the standard environment variable; returns what the receiver decoded."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
    writer = SpanWriter(loader, OPTS, span_exporter("http/protobuf"))
    total = 0
    for batch, extra in batches:
        spans = writer.write(batch, extra)
        writer.export(spans)
        total += len(spans) if spans is not None else 0
    writer.shutdown()
    return receiver.wait_for(lambda s: len(s) >= total, 10)


def test_tcp_connections_become_client_and_server_spans(receiver, loader, monkeypatch) -> None:
    batch = make_batch("tcp_connections", TCP_ROWS)
    got = export_http(receiver, monkeypatch, loader, (batch, None))
    assert len(got) == 4
    client = otlp_of(got, "client", "network.peer.port", 8080)
    assert client.name == "tcp connect"
    assert client.span.start_time_unix_nano == T0 and client.span.end_time_unix_nano == T0 + 5_000_000
    assert client.attributes == {
        "network.transport": "tcp",
        "network.type": "ipv4",
        "network.peer.address": "127.0.0.1",
        "network.peer.port": 8080,
        "network.local.address": "127.0.0.1",
        "network.local.port": 40000,
        "server.address": "127.0.0.1",
        "server.port": 8080,
        "client.address": "127.0.0.1",
        "client.port": 40000,
        "process.pid": 100,
        "process.executable.name": "curl",
        "fleetscope.tcp.bytes_sent": 120,
        "fleetscope.tcp.bytes_received": 3000,
        "fleetscope.tcp.srtt_us": 35,
        "fleetscope.tcp.retransmits": 1,
        "fleetscope.tcp.handshake_ns": 40_000,
        "fleetscope.cgroup_id": 77,
        "fleetscope.netns": 4026531840,
    }
    assert client.span.status.code == 0  # unset
    assert client.resource == {"service.name": "curl", "host.name": "node-a"}
    assert client.scope == "fleetscope"
    server = otlp_of(got, "server", "network.peer.port", 40000)
    assert server.name == "tcp accept"
    a = server.attributes
    assert (a["server.port"], a["client.port"], a["network.local.port"]) == (8080, 40000, 8080)
    assert (a["fleetscope.tcp.bytes_sent"], a["fleetscope.tcp.bytes_received"]) == (3000, 120)
    assert "fleetscope.tcp.handshake_ns" not in a
    assert server.resource == {"service.name": "nginx", "host.name": "node-a"}
    refused = otlp_of(got, "client", "network.peer.port", 9)
    assert refused.span.status.code == 2 and refused.span.status.message == "ECONNREFUSED"
    ra = refused.attributes
    assert (ra["error.type"], ra["fleetscope.tcp.reset"], ra["network.type"], ra["network.peer.address"]) == (
        "ECONNREFUSED",
        "received",
        "ipv6",
        "::1",
    )
    orphan = otlp_of(got, "server", "network.peer.port", 50000)
    assert "process.pid" not in orphan.attributes and orphan.attributes["client.address"] == "2001:db8::1"
    assert orphan.resource == {"service.name": "unknown_service", "host.name": "node-a"}
    # the same spans in fleet.otel_traces, in the exporter's layout and spelling
    rows = loader._client.query(
        "SELECT TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName, Duration, StatusCode, StatusMessage, "
        "SpanAttributes, ResourceAttributes, toUnixTimestamp64Nano(Timestamp), ScopeName, length(Events.Name) "
        "FROM fleet.otel_traces ORDER BY Timestamp"
    ).result_rows
    by_span = {r[1]: r for r in rows}
    assert len(rows) == 4
    for s in got:
        r = by_span[s.span_id]
        assert r[0] == s.trace_id and r[2] == "" and r[3] == s.name and r[12] == "fleetscope" and r[13] == 0
        assert r[4] == {"client": "Client", "server": "Server"}[s.kind]
        assert r[6] == s.span.end_time_unix_nano - s.span.start_time_unix_nano
        assert r[11] == s.span.start_time_unix_nano
        assert r[9] == {k: str(v) for k, v in s.attributes.items()}
        assert r[10] == s.resource and r[5] == s.resource["service.name"]
        assert (r[7], r[8]) == (("Error", "ECONNREFUSED") if s.span.status.code == 2 else ("Unset", ""))


def test_ids_are_derived_from_node_stream_batch_and_row(loader) -> None:
    a = build(make_batch("tcp_connections", TCP_ROWS), OPTS)
    again = build(make_batch("tcp_connections", TCP_ROWS), OPTS)
    other = build(make_batch("tcp_connections", TCP_ROWS, batch_id="m1-x-1-2"), OPTS)
    elsewhere = build(make_batch("tcp_connections", TCP_ROWS, node="node-b"), OPTS)
    assert a is not None and again is not None and other is not None and elsewhere is not None
    assert np.array_equal(a.trace_id, again.trace_id) and np.array_equal(a.span_id, again.span_id)
    ids = {bytes(r) for s in (a, other, elsewhere) for r in s.span_id}
    assert len(ids) == 12 and all(any(r) for r in a.trace_id)
    # a redelivered batch is stored once: the spans' insert is deduplicated on "<batch id>:spans"
    writer = SpanWriter(loader, OPTS)
    batch = make_batch("tcp_connections", TCP_ROWS)
    writer.write(batch)
    writer.write(batch)
    count, traces = loader._client.query("SELECT count(), uniqExact(TraceId) FROM fleet.otel_traces").result_rows[0]
    assert (count, traces) == (4, 4)
    # what Grafana's trace-id lookup reads (a repeated insert only repeats min/max, which merge)
    lookup = loader._client.query(
        "SELECT TraceId, min(Start), max(End) FROM fleet.otel_traces_trace_id_ts GROUP BY TraceId"
    ).result_rows
    assert sorted(r[0] for r in lookup) == sorted({bytes(r).hex() for r in a.trace_id})


def strings(values: list[str]) -> StringColumn:
    data, offsets, index = encode_strings(np.array([v.encode() for v in values], dtype="S64"))
    return StringColumn(data, offsets, index)


def labels(maps: list[dict[str, str]]) -> native.MapColumn:
    entries = [(k, v) for m in maps for k, v in m.items()]
    return native.MapColumn(
        np.cumsum([len(m) for m in maps]).astype("<u8"),
        strings([k for k, _ in entries]),
        strings([v for _, v in entries]),
    )


def k8s_columns(pods: list[tuple[str, ...]], maps: list[dict[str, str]]) -> dict[str, Any]:
    """What the enrichment stage hands over per row: (namespace, pod, container, kind,
    workload, node, container id, pod uid), or all "" for a host process."""
    names = (
        "k8s_namespace",
        "k8s_pod",
        "k8s_container",
        "k8s_workload_kind",
        "k8s_workload",
        "k8s_node",
        "container_id",
        "pod_uid",
    )
    out: dict[str, Any] = {n: strings([p[i] for p in pods]) for i, n in enumerate(names)}
    out["k8s_labels"] = labels(maps)
    return out


def test_kubernetes_identity_becomes_resource_attributes(receiver, loader, monkeypatch) -> None:
    web = ("shop", "web-7d9f-abcde", "nginx", "Deployment", "web", "worker-1", "c0ffee", "uid-web")
    db = ("shop", "db-0", "postgres", "StatefulSet", "db", "worker-2", "beef", "uid-db")
    host = ("",) * 8
    extra = k8s_columns([web, db, web, host], [{"app.kubernetes.io/name": "storefront", "tier": "web"}, {}, {}, {}])
    got = export_http(receiver, monkeypatch, loader, (make_batch("tcp_connections", TCP_ROWS), extra))
    client = otlp_of(got, "client", "network.peer.port", 8080)
    assert client.resource == {
        "service.name": "storefront",
        "host.name": "node-a",
        "k8s.node.name": "worker-1",
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "web-7d9f-abcde",
        "k8s.pod.uid": "uid-web",
        "k8s.container.name": "nginx",
        "container.id": "c0ffee",
        "k8s.deployment.name": "web",
    }
    server = otlp_of(got, "server", "network.peer.port", 40000)
    assert server.resource["service.name"] == "db"  # no app label: the workload's name
    assert server.resource["k8s.statefulset.name"] == "db" and "k8s.deployment.name" not in server.resource
    refused = otlp_of(got, "client", "network.peer.port", 9)
    assert refused.resource["service.name"] == "web" and refused.resource["k8s.pod.name"] == "web-7d9f-abcde"
    orphan = otlp_of(got, "server", "network.peer.port", 50000)
    assert orphan.resource == {"service.name": "unknown_service", "host.name": "node-a"}  # host: node only
    res = dict(
        loader._client.query(
            "SELECT SpanAttributes['network.peer.port'], ResourceAttributes FROM fleet.otel_traces"
        ).result_rows
    )
    assert res["8080"] == client.resource and res["50000"] == orphan.resource


def test_process_lifetimes_above_the_threshold(receiver, loader, monkeypatch) -> None:
    second = 1_000_000_000
    rows = [
        {"time": T0, "pid": 10, "ppid": 1, "cgroup_id": 5, "comm": "backup", "exit_code": 0, "duration_ns": 3 * second},
        {"time": T0, "pid": 11, "ppid": 1, "cgroup_id": 5, "comm": "sh", "exit_code": 0, "duration_ns": second // 2},
        {"time": T0 + 5, "pid": 12, "ppid": 10, "cgroup_id": 5, "comm": "job", "exit_code": 3, "duration_ns": second},
        {
            "time": T0 + 9,
            "pid": 13,
            "ppid": 10,
            "cgroup_id": 6,
            "comm": "crash",
            "signal": 11,
            "duration_ns": 2 * second,
        },
    ]
    got = export_http(receiver, monkeypatch, loader, (make_batch("process_exit", rows), None))
    by_pid = {s.attributes["process.pid"]: s for s in got}
    assert sorted(by_pid) == [10, 12, 13]  # pid 11 lived 0.5 s, under the 1 s threshold
    ok = by_pid[10]
    assert ok.name == "process backup" and ok.kind == "internal" and ok.span.status.code == 0
    assert (ok.span.start_time_unix_nano, ok.span.end_time_unix_nano) == (T0 - 3 * second, T0)
    assert ok.attributes == {
        "process.pid": 10,
        "process.parent_pid": 1,
        "process.executable.name": "backup",
        "process.exit.code": 0,
        "fleetscope.cgroup_id": 5,
    }
    assert (by_pid[12].span.status.code, by_pid[12].span.status.message) == (2, "exit code 3")
    crash = by_pid[13]
    assert (crash.span.status.code, crash.span.status.message) == (2, "killed by SIGSEGV")
    assert crash.attributes["fleetscope.process.signal"] == "SIGSEGV" and "process.exit.code" not in crash.attributes
    assert [(e.name, e.time_unix_nano) for e in crash.span.events] == [("process.signal", T0 + 9)]
    events = loader._client.query(
        "SELECT SpanName, Events.Name, arrayMap(t -> toUnixTimestamp64Nano(t), Events.Timestamp), Events.Attributes "
        "FROM fleet.otel_traces ORDER BY SpanName"
    ).result_rows
    assert events == [
        ("process backup", [], [], []),
        ("process crash", ["process.signal"], [T0 + 9], [{"fleetscope.process.signal": "SIGSEGV"}]),
        ("process job", [], [], []),
    ]


def test_fatal_signals_and_oom_kills_become_spans(receiver, loader, monkeypatch) -> None:
    fatal = [
        {
            "time": T0,
            "pid": 20,
            "ppid": 1,
            "uid": 1000,
            "cgroup_id": 9,
            "comm": "victim",
            "signal": 9,
            "core_dumped": 0,
            "sender_known": 1,
            "code": 0,
            "sender_pid": 30,
            "sender_uid": 0,
            "sender_comm": "kill",
            "sender_cgroup_id": 3,
            "delay_ns": 70_000,
        }
    ]
    oom = [
        {
            "time": T0 + 1,
            "pid": 21,
            "uid": 0,
            "cgroup_id": 9,
            "comm": "hog",
            "total_vm_kb": 900_000,
            "anon_rss_kb": 800_000,
            "file_rss_kb": 10,
            "shmem_rss_kb": 0,
            "pgtables_kb": 1600,
            "oom_score_adj": 0,
            "trigger_pid": 21,
            "trigger_comm": "hog",
            "trigger_cgroup_id": 9,
        }
    ]
    got = export_http(
        receiver,
        monkeypatch,
        loader,
        (make_batch("fatal_signals", fatal), None),
        (make_batch("oom_kills", oom, batch_id="m1-oom-1-1"), None),
    )
    sig = next(s for s in got if s.name == "signal SIGKILL")
    assert (sig.span.start_time_unix_nano, sig.span.end_time_unix_nano) == (T0 - 70_000, T0)
    assert (sig.span.status.code, sig.span.status.message) == (2, "killed by SIGKILL")
    assert sig.attributes == {
        "process.pid": 20,
        "process.parent_pid": 1,
        "process.user.id": 1000,
        "process.executable.name": "victim",
        "fleetscope.process.signal": "SIGKILL",
        "fleetscope.signal.code": 0,
        "fleetscope.signal.core_dumped": False,
        "fleetscope.signal.sender.pid": 30,
        "fleetscope.signal.sender.uid": 0,
        "fleetscope.signal.sender.name": "kill",
        "fleetscope.cgroup_id": 9,
    }
    kill = next(s for s in got if s.name == "oom kill")
    assert kill.span.start_time_unix_nano == kill.span.end_time_unix_nano == T0 + 1
    assert kill.attributes["fleetscope.oom.anon_rss_kb"] == 800_000 and kill.resource["service.name"] == "hog"


SECOND = 1_000_000_000
OOM_FIGURES = dict(oom_total_vm_kb=900_000, oom_anon_rss_kb=800_000, oom_file_rss_kb=10, oom_shmem_rss_kb=4,
                   oom_pgtables_kb=1600, oom_score_adj=500, oom_trigger_pid=40)  # fmt: skip
SENDER = dict(signal_sender_known=1, signal_code=128, signal_sender_pid=40, signal_sender_uid=0,
              signal_sender_comm="alloc", fatal_signals_joined=1)  # fmt: skip
JOINED_EXITS = [
    # long-lived, OOM-killed: SIGKILL from the allocating task (generated 90 us before the
    # exit), marked a victim 80 us before the exit
    {
        "time": T0,
        "pid": 50,
        "ppid": 1,
        "cgroup_id": 9,
        "comm": "hog",
        "signal": 9,
        "duration_ns": 5 * SECOND,
        "oom_killed": 1,
        "oom_delay_ns": 80_000,
        "signal_delay_ns": 90_000,
        **OOM_FIGURES,
        **SENDER,
    },
    # the same, short-lived: no process span, an "oom kill" and a "signal SIGKILL" span instead
    {
        "time": T0 + 7,
        "pid": 51,
        "ppid": 1,
        "cgroup_id": 9,
        "comm": "hog",
        "signal": 9,
        "duration_ns": SECOND // 10,
        "oom_killed": 1,
        "oom_delay_ns": 80_000,
        "signal_delay_ns": 90_000,
        **OOM_FIGURES,
        **SENDER,
    },
    # short-lived, SIGSEGV (its own fault): a "signal SIGSEGV" span
    {
        "time": T0 + 8,
        "pid": 52,
        "ppid": 1,
        "cgroup_id": 9,
        "comm": "crash",
        "signal": 11,
        "duration_ns": 1000,
        "signal_delay_ns": 5_000,
        **SENDER,
        "signal_code": 1,
        "signal_sender_pid": 52,
        "signal_sender_comm": "crash",
    },
    # short-lived, SIGTERM: fatal_signals reports no SIGTERM, so no span at all
    {
        "time": T0 + 9,
        "pid": 53,
        "ppid": 1,
        "cgroup_id": 9,
        "comm": "sleep",
        "signal": 15,
        "duration_ns": 1000,
        "fatal_signals_joined": 1,
    },
    # short-lived SIGKILL on a node where fatal_signals did not share its map: its own row makes the span
    {"time": T0 + 10, "pid": 54, "ppid": 1, "cgroup_id": 9, "comm": "sleep", "signal": 9, "duration_ns": 1000},
]


def test_oom_kill_and_signal_are_events_of_the_process_span(receiver, loader, monkeypatch) -> None:
    got = export_http(receiver, monkeypatch, loader, (make_batch("process_exit", JOINED_EXITS), None))
    assert sorted((s.name, s.attributes["process.pid"]) for s in got) == [
        ("oom kill", 51), ("process hog", 50), ("signal SIGKILL", 51), ("signal SIGSEGV", 52),
    ]  # fmt: skip
    hog = next(s for s in got if s.name == "process hog")
    assert (hog.span.status.code, hog.span.status.message) == (2, "killed by SIGKILL")
    figures = {
        "fleetscope.oom.total_vm_kb": 900_000,
        "fleetscope.oom.anon_rss_kb": 800_000,
        "fleetscope.oom.file_rss_kb": 10,
        "fleetscope.oom.shmem_rss_kb": 4,
        "fleetscope.oom.pgtables_kb": 1600,
        "fleetscope.oom.oom_score_adj": 500,
        "fleetscope.oom.trigger.pid": 40,
    }
    sender = {
        "fleetscope.signal.code": 128,
        "fleetscope.signal.sender.pid": 40,
        "fleetscope.signal.sender.uid": 0,
        "fleetscope.signal.sender.name": "alloc",
    }
    # in time order: the OOM killer sends SIGKILL, then marks the victim
    assert [(e.name, e.time_unix_nano, attributes(e.attributes)) for e in hog.span.events] == [
        ("process.signal", T0 - 90_000, {"fleetscope.process.signal": "SIGKILL", **sender}),
        ("process.oom_kill", T0 - 80_000, figures),
    ]
    kill = next(s for s in got if s.name == "oom kill")
    assert kill.span.start_time_unix_nano == kill.span.end_time_unix_nano == T0 + 7 - 80_000
    assert kill.attributes == {
        "process.pid": 51, "process.parent_pid": 1, "process.executable.name": "hog", **figures,
        "fleetscope.cgroup_id": 9,
    }  # fmt: skip
    sig = next(s for s in got if s.name == "signal SIGKILL")
    assert (sig.span.start_time_unix_nano, sig.span.end_time_unix_nano) == (T0 + 7 - 90_000, T0 + 7)
    assert (sig.span.status.code, sig.span.status.message) == (2, "killed by SIGKILL")
    assert sig.attributes == {
        "process.pid": 51, "process.parent_pid": 1, "process.executable.name": "hog",
        "fleetscope.process.signal": "SIGKILL", **sender, "fleetscope.cgroup_id": 9,
    }  # fmt: skip
    segv = next(s for s in got if s.name == "signal SIGSEGV")
    assert segv.attributes["fleetscope.signal.sender.pid"] == 52 and segv.attributes["fleetscope.signal.code"] == 1
    ids = {s.span_id for s in got}
    assert len(ids) == 4  # the standalone spans of one row have ids of their own
    # fleet.otel_traces: the same spans, the events in Events.* in the same order
    rows = loader._client.query(
        "SELECT SpanId, Events.Name, arrayMap(t -> toUnixTimestamp64Nano(t), Events.Timestamp), Events.Attributes "
        "FROM fleet.otel_traces"
    ).result_rows
    assert {r[0] for r in rows} == ids
    stored = {r[0]: r[1:] for r in rows}
    assert stored[hog.span_id] == (
        ["process.signal", "process.oom_kill"],
        [T0 - 90_000, T0 - 80_000],
        [{"fleetscope.process.signal": "SIGKILL", **{k: str(v) for k, v in sender.items()}},
         {k: str(v) for k, v in figures.items()}],
    )  # fmt: skip
    assert all(stored[i] == ([], [], []) for i in ids - {hog.span_id})


def test_rows_their_process_exit_carries_make_no_span_of_their_own(loader) -> None:
    fatal = [
        {"time": T0, "pid": 20, "ppid": 1, "comm": "a", "signal": 9, "in_process_exit": 1},
        {"time": T0, "pid": 21, "ppid": 1, "comm": "b", "signal": 9, "in_process_exit": 0},
    ]
    oom = [
        {"time": T0, "pid": 22, "comm": "c", "trigger_comm": "c", "in_process_exit": 1},
        {"time": T0, "pid": 23, "comm": "d", "trigger_comm": "d", "in_process_exit": 0},
        {"time": T0, "pid": 24, "comm": "e", "trigger_comm": "e", "in_process_exit": 1},
    ]
    signals = build(make_batch("fatal_signals", fatal), OPTS)
    kills = build(make_batch("oom_kills", oom), OPTS)
    assert signals is not None and kills is not None
    assert signals.source_rows.tolist() == [1] and kills.source_rows.tolist() == [1]
    # ids stay those of (node, stream, batch id, row): the same as before the filter
    trace, span = spans_mod.span_ids("node-a", "oom_kills", "m1-x-1-1", np.array([1]))
    assert np.array_equal(kills.span_id, span) and np.array_equal(kills.trace_id, trace)
    # the process spans and their standalone companions are deterministic too
    a, b = (build(make_batch("process_exit", JOINED_EXITS), OPTS) for _ in range(2))
    assert a is not None and b is not None
    assert np.array_equal(a.span_id, b.span_id) and a.source_rows.tolist() == [0, 1, 1, 2]


def test_grpc_protocol_and_streams_without_spans(receiver, loader, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    writer = SpanWriter(loader, OPTS, span_exporter("grpc"))
    writer.export(writer.write(make_batch("tcp_connections", TCP_ROWS)))
    writer.shutdown()
    got = receiver.wait_for(lambda s: len(s) >= 4, 10)
    assert sorted(s.kind for s in got) == ["client", "client", "server", "server"]
    exec_rows = [{"time": T0, "pid": 1, "comm": "sh", "filename": "/bin/sh", "args": "sh"}]
    assert build(make_batch("process_exec", exec_rows), OPTS) is None


def test_readable_spans_share_one_resource_per_pod() -> None:
    web = ("shop", "web-1", "nginx", "Deployment", "web", "n1", "c1", "u1")
    extra = k8s_columns([web, web, web, web], [{}] * 4)
    spans = build(make_batch("tcp_connections", TCP_ROWS), OPTS, extra)
    assert spans is not None
    readable = readable_spans(spans)
    assert len({id(s.resource) for s in readable}) == 1  # one OTLP ResourceSpans for the pod
    assert spans_mod.SIGNAL_NAMES[9] == "SIGKILL"
