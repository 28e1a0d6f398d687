"""What a kernel-derived span costs the ingester, per row of a tcp_connections batch.

Stages, each timed over whole batches of 16384 rows (a full batch at the default
batch_max_rows), CPU time of this process:
- rows insert: the batch's own insert into fleet.tcp_connections (the reference);
- build: the span columns from the decoded batch (ingester/spans.py, numpy);
- otel_traces insert: the Native block of the exporter layout into fleet.otel_traces;
- readable spans: one SDK ReadableSpan per span (the OTLP hand-over's own cost);
- OTLP encode: the SDK's protobuf encoding of those spans (what the exporter sends);
- OTLP/HTTP export: the SDK exporter posting them to a local receiver (encode + HTTP).

Run: .venv/bin/python bench/span_export.py  (writes bench/results/span_export.txt)
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402

from fleetscope.codec import SCHEMAS, decode_batch, encode_batch  # noqa: E402
from fleetscope.otel import SCOPE, span_exporter  # noqa: E402
from fleetscope.store import connect, migrate  # noqa: E402
from fleetscope.v1 import batch_pb2  # noqa: E402
from ingester.load import BatchLoader  # noqa: E402
from ingester.spans import SpanOptions, build, otel_columns  # noqa: E402
from ingester.traces import readable_spans  # noqa: E402
from tests.support.otlp_receiver import otlp_receiver  # noqa: E402

ROWS = 16384
BATCHES = 6
RESULTS = ROOT / "bench" / "results" / "span_export.txt"


def tcp_batch(seq: int, rng: np.random.Generator) -> bytes:
    """A realistic tcp_connections batch: 200 peers, 50 programs, mixed roles and figures."""
    schema = SCHEMAS["tcp_connections"]
    n = ROWS
    peers = [socket.inet_pton(socket.AF_INET6, f"::ffff:10.0.{i // 250}.{i % 250 + 1}") for i in range(200)]
    addrs = np.frombuffer(b"".join(peers), "<u4").reshape(200, 4)
    now = time.time_ns()
    cols = {
        "time": now + np.arange(n, dtype=np.uint64) * 1000,
        "duration_ns": rng.integers(10**5, 10**9, n, np.uint64),
        "handshake_ns": rng.integers(10**4, 10**6, n, np.uint64),
        "pid": rng.integers(1, 50, n, np.uint32) + 1000,
        "comm": np.array([f"prog{i % 50}".encode() for i in range(n)], "S16"),
        "cgroup_id": rng.integers(1, 30, n, np.uint64),
        "owner_known": np.ones(n, np.uint32),
        "role": np.array([b"connect", b"accept"], "S8")[rng.integers(0, 2, n)],
        "family": np.full(n, 4, np.uint32),
        "local_addr": addrs[rng.integers(0, 200, n)],
        "local_port": rng.integers(1024, 65535, n, np.uint32),
        "remote_addr": addrs[rng.integers(0, 200, n)],
        "remote_port": rng.integers(1, 1024, n, np.uint32),
        "netns": np.full(n, 4026531840, np.uint32),
        "bytes_sent": rng.integers(0, 10**7, n, np.uint64),
        "bytes_received": rng.integers(0, 10**7, n, np.uint64),
        "srtt_us": rng.integers(10, 5000, n, np.uint32),
        "retransmits": rng.integers(0, 3, n, np.uint32),
        "reset": np.array([b"", b"received"], "S8")[(rng.random(n) < 0.02).astype(int)],
        "failed": (rng.random(n) < 0.01).astype(np.uint32),
        "error": np.array([b"", b"ECONNREFUSED"], "S12")[(rng.random(n) < 0.01).astype(int)],
    }
    header = batch_pb2.BatchHeader(
        node=batch_pb2.NodeIdentity(host_name="bench-node", machine_id="bench"),
        batch_id=f"bench-tcp-1-{seq}",
        stream="tcp_connections",
        epoch=1,
        sequence=seq,
        created_ns=now,
        row_count=n,
    )
    return encode_batch(schema, header, cols)


def cpu(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def main() -> None:
    rng = np.random.default_rng(5)
    client = connect(f"chdb://{tempfile.mkdtemp(prefix='span-bench-')}")
    migrate(client)
    loader = BatchLoader(client)
    opts = SpanOptions(process_min_duration_ns=10**9)
    totals: dict[str, float] = {}

    def add(stage: str, seconds: float) -> None:
        totals[stage] = totals.get(stage, 0.0) + seconds

    with otlp_receiver() as receiver:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.http_endpoint  # read by the SDK's exporter
        exporter = span_exporter("http/protobuf")
        for seq in range(1, BATCHES + 1):
            batch = decode_batch(SCHEMAS["tcp_connections"], tcp_batch(seq, rng))
            t, _ = cpu(lambda b=batch: loader.insert(b))
            add("rows insert (fleet.tcp_connections, reference)", t)
            t, spans = cpu(lambda b=batch: build(b, opts))
            add("build span columns", t)
            assert spans is not None
            t, cols = cpu(lambda s=spans: otel_columns(s, (SCOPE, "bench")))
            add("otel_traces columns", t)
            t, _ = cpu(
                lambda c=cols, s=spans, q=seq: loader.insert_columns(
                    "otel_traces", c, rows=len(s), dedup_token=f"bench-{q}:spans"
                )
            )
            add("otel_traces insert (Native block + engine)", t)
            t, readable = cpu(lambda s=spans: readable_spans(s))
            add("ReadableSpan objects (OTLP hand-over)", t)
            t, _ = cpu(lambda r=readable: encode_spans(r).SerializeToString())
            add("OTLP protobuf encode (SDK encoder)", t)
            wall = time.perf_counter()
            t, _ = cpu(lambda r=readable: exporter.export(r))
            add("OTLP/HTTP export (encode + POST, SDK exporter)", t)
            add("OTLP/HTTP export wall", time.perf_counter() - wall)
        exporter.shutdown()
        received = len(receiver.spans)
    loader.close()
    rows = ROWS * BATCHES
    stored_lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus: {os.cpu_count()}  engine: chdb (embedded ClickHouse)",
        f"batches: {BATCHES} x {ROWS} rows of tcp_connections -> {rows} spans (OTLP receiver got {received})",
        "stage                                               us/row (CPU of this process)",
    ]
    for stage, seconds in totals.items():
        stored_lines.append(f"{stage:<52}{seconds / rows * 1e6:8.2f}")
    columnar = sum(totals[k] for k in totals if k.startswith(("build", "otel_traces")))
    otlp = totals["ReadableSpan objects (OTLP hand-over)"] + totals["OTLP/HTTP export (encode + POST, SDK exporter)"]
    stored_lines += [
        f"spans to fleet.otel_traces (build + columns + insert): {columnar / rows * 1e6:.2f} us/span",
        f"spans over OTLP (ReadableSpans + SDK export):          {otlp / rows * 1e6:.2f} us/span",
    ]
    RESULTS.write_text("\n".join(stored_lines) + "\n")
    print("\n".join(stored_lines))


if __name__ == "__main__":
    main()
