"""Columnar batches per event kind, bounded by rows, bytes and age.

Raw ring-buffer records (numpy structured arrays) accumulate per stream; a flush turns
them into protobuf columns in a few vectorised numpy operations and encodes one batch.
"""

from __future__ import annotations

import platform
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetscope import __version__
from fleetscope.codec import SCHEMA_MINOR, SCHEMAS, encode_batch
from fleetscope.v1 import batch_pb2
from node_agent.cgroups import IDENTITY_COLUMNS, CgroupResolver, empty_columns
from node_agent.columns import ColumnBuilder, boot_to_wall_offset_ns


@dataclass(frozen=True)
class Batch:
    """An encoded batch ready for the hand-over: Kafka message value, key and headers."""

    stream: str
    batch_id: str
    sequence: int
    rows: int
    payload: bytes
    key: bytes
    created_ns: int
    trace_headers: tuple[tuple[str, bytes], ...] = ()  # W3C trace context (traceparent), set by the sink

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers: schema, batch id and, when the pipeline is traced, the W3C trace
        context of the agent's span for this batch, which the ingester continues."""
        return [
            ("fs-schema", f"fleetscope.v1.{self.stream};minor={SCHEMA_MINOR}".encode()),
            ("fs-batch-id", self.batch_id.encode()),
            *self.trace_headers,
        ]


def node_identity(node_name: str) -> batch_pb2.NodeIdentity:
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine_id = ""
    return batch_pb2.NodeIdentity(
        host_name=node_name or socket.gethostname(),
        machine_id=machine_id or socket.gethostname(),
        kernel_release=platform.release(),
        agent_version=__version__,
    )


def _concatenate(chunks: list[np.ndarray]) -> np.ndarray:
    """Records of one dtype, concatenated as whole records: numpy copies a structured dtype
    field by field, a same-sized void dtype with one memcpy per run (about 2x faster)."""
    dtype = chunks[0].dtype
    whole = np.dtype((np.void, dtype.itemsize))
    return np.concatenate([c.view(whole) for c in chunks]).view(dtype)


@dataclass
class _Pending:
    chunks: list[np.ndarray] = field(default_factory=list)
    rows: int = 0
    first_ns: int = 0


class Batcher:
    """Accumulates records per stream and cuts batches at max rows, bytes or age.

    The byte bound uses each stream's encoded bytes per row learned from its last batch
    (dictionary encoding makes it far smaller than the fixed record); a batch that still
    encodes over the bound is split in two, so no batch exceeds it.

    Every stream whose batch message has the identity columns (container_id, pod_uid, ...)
    gets them from its cgroup_id column here, whatever its probe: ids are resolved when
    records arrive (their cgroups may be gone by the time the batch is cut) and again,
    from the resolver's cache, per distinct id when the batch is encoded.
    """

    SAFETY = 1.25  # headroom on the learned bytes per row

    def __init__(
        self,
        node: batch_pb2.NodeIdentity,
        builders: Mapping[str, ColumnBuilder],
        max_rows: int,
        max_bytes: int,
        max_age: float,
        identity: CgroupResolver | None = None,
    ) -> None:
        self.node = node
        self.builders = builders
        self.identity = identity
        self.max_rows, self.max_bytes, self.max_age_ns = max_rows, max_bytes, int(max_age * 1e9)
        self.epoch = time.time_ns()
        self._seq: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        self._row_bytes: dict[str, float] = {}

    def add(self, stream: str, records: np.ndarray) -> list[Batch]:
        """Take drained records; returns the batches that are now full."""
        out = []
        if self.identity is not None and records.dtype.names and "cgroup_id" in records.dtype.names:
            self.identity.observe(records["cgroup_id"])
        # before the first batch, assume the worst: every byte of the record is encoded
        worst = records.dtype.itemsize + 4 * len(records.dtype.names or ())
        pos = 0
        while pos < len(records):
            row_bytes = self._row_bytes.get(stream, worst)
            cap_rows = max(1, min(self.max_rows, int(self.max_bytes / (row_bytes * self.SAFETY))))
            p = self._pending.setdefault(stream, _Pending())
            if not p.rows:
                p.first_ns = time.monotonic_ns()
            take = min(max(cap_rows - p.rows, 0), len(records) - pos)
            p.chunks.append(records[pos : pos + take])
            p.rows += take
            pos += take
            if p.rows >= cap_rows:
                out += self._cut(stream)
        return out

    def due(self, now_ns: int | None = None) -> list[Batch]:
        """Batches whose oldest row reached max age."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        old = [s for s, p in self._pending.items() if p.rows and now_ns - p.first_ns >= self.max_age_ns]
        return [b for s in old for b in self._cut(s)]

    def cut_now(self, stream: str, records: np.ndarray) -> list[Batch]:
        """Batches of exactly these records, now (for rows the agent makes itself)."""
        pending = self._pending.pop(stream, None)
        self._pending[stream] = _Pending([records], len(records), time.monotonic_ns())
        batches = self._cut(stream)
        if pending is not None:
            self._pending[stream] = pending
        return batches

    def flush(self) -> list[Batch]:
        return [b for s in [s for s, p in self._pending.items() if p.rows] for b in self._cut(s)]

    @property
    def pending_rows(self) -> int:
        return sum(p.rows for p in self._pending.values())

    def _cut(self, stream: str) -> list[Batch]:
        p = self._pending.pop(stream)
        records = p.chunks[0] if len(p.chunks) == 1 else _concatenate(p.chunks)
        return self._encode(stream, records)

    def _encode(self, stream: str, records: np.ndarray) -> list[Batch]:
        columns = self.builders[stream](records, boot_to_wall_offset_ns())
        self._add_identity(stream, columns, len(records))
        seq = self._seq.get(stream, 0) + 1
        batch_id = f"{self.node.machine_id}-{stream}-{self.epoch:x}-{seq}"
        created = time.time_ns()
        header = batch_pb2.BatchHeader(
            node=self.node, batch_id=batch_id, stream=stream, epoch=self.epoch, sequence=seq,
            created_ns=created, row_count=len(records), schema_minor=SCHEMA_MINOR,
        )  # fmt: skip
        payload = encode_batch(SCHEMAS[stream], header, columns)
        if len(records):
            learned = len(payload) / len(records)
            self._row_bytes[stream] = (self._row_bytes.get(stream, learned) + learned) / 2
        if len(payload) > self.max_bytes and len(records) > 1:
            half = len(records) // 2  # the sequence number was not taken: halves get seq, seq+1
            return self._encode(stream, records[:half]) + self._encode(stream, records[half:])
        self._seq[stream] = seq
        return [Batch(stream, batch_id, seq, len(records), payload, self.node.host_name.encode(), created)]

    def _add_identity(self, stream: str, columns: dict[str, Any], rows: int) -> None:
        """Workload identity columns from cgroup_id, for streams whose message declares them."""
        names = {c.name for c in SCHEMAS[stream].columns}
        if "cgroup_id" not in columns or not names.issuperset(IDENTITY_COLUMNS):
            return
        ids = columns["cgroup_id"]
        identity = self.identity.columns(ids) if self.identity is not None else empty_columns(rows)
        for name, column in identity.items():
            columns.setdefault(name, column)
