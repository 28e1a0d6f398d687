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

import numpy as np

from fleetscope import __version__
from fleetscope.codec import SCHEMA_MINOR, SCHEMAS, encode_batch
from fleetscope.v1 import batch_pb2
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

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("fs-schema", f"fleetscope.v1.{self.stream};minor={SCHEMA_MINOR}".encode()),
            ("fs-batch-id", self.batch_id.encode()),
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


@dataclass
class _Pending:
    chunks: list[np.ndarray] = field(default_factory=list)
    rows: int = 0
    first_ns: int = 0


class Batcher:
    """Accumulates records per stream and cuts batches at max rows, bytes or age.

    Bytes are bounded by the records' fixed size, an upper bound of the encoded size
    (dictionary encoding never grows a string column beyond its fixed width + 4 bytes).
    """

    def __init__(
        self,
        node: batch_pb2.NodeIdentity,
        builders: Mapping[str, ColumnBuilder],
        max_rows: int,
        max_bytes: int,
        max_age: float,
    ) -> None:
        self.node = node
        self.builders = builders
        self.max_rows, self.max_bytes, self.max_age_ns = max_rows, max_bytes, int(max_age * 1e9)
        self.epoch = time.time_ns()
        self._seq: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}

    def add(self, stream: str, records: np.ndarray) -> list[Batch]:
        """Take drained records; returns the batches that are now full."""
        out = []
        per_row = records.dtype.itemsize + 4 * len(records.dtype.names or ())
        cap_rows = max(1, min(self.max_rows, self.max_bytes // per_row))
        pos = 0
        while pos < len(records):
            p = self._pending.setdefault(stream, _Pending())
            if not p.rows:
                p.first_ns = time.monotonic_ns()
            take = min(cap_rows - p.rows, len(records) - pos)
            p.chunks.append(records[pos : pos + take])
            p.rows += take
            pos += take
            if p.rows >= cap_rows:
                out.append(self._cut(stream))
        return out

    def due(self, now_ns: int | None = None) -> list[Batch]:
        """Batches whose oldest row reached max age."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        return [
            self._cut(s)
            for s, p in list(self._pending.items())
            if p.rows and now_ns - p.first_ns >= self.max_age_ns
        ]

    def cut_now(self, stream: str, records: np.ndarray) -> Batch:
        """A batch of exactly these records, now (for rows the agent makes itself)."""
        pending = self._pending.pop(stream, None)
        self._pending[stream] = _Pending([records], len(records), time.monotonic_ns())
        batch = self._cut(stream)
        if pending is not None:
            self._pending[stream] = pending
        return batch

    def flush(self) -> list[Batch]:
        return [self._cut(s) for s, p in list(self._pending.items()) if p.rows]

    @property
    def pending_rows(self) -> int:
        return sum(p.rows for p in self._pending.values())

    def _cut(self, stream: str) -> Batch:
        p = self._pending.pop(stream)
        records = p.chunks[0] if len(p.chunks) == 1 else np.concatenate(p.chunks)
        seq = self._seq[stream] = self._seq.get(stream, 0) + 1
        batch_id = f"{self.node.machine_id}-{stream}-{self.epoch:x}-{seq}"
        created = time.time_ns()
        header = batch_pb2.BatchHeader(
            node=self.node, batch_id=batch_id, stream=stream, epoch=self.epoch, sequence=seq,
            created_ns=created, row_count=len(records), schema_minor=SCHEMA_MINOR,
        )  # fmt: skip
        columns = self.builders[stream](records, boot_to_wall_offset_ns())
        payload = encode_batch(SCHEMAS[stream], header, columns)
        return Batch(stream, batch_id, seq, len(records), payload, self.node.host_name.encode(), created)
