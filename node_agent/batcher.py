"""Columnar batches per event kind, bounded by rows, bytes and age.

Raw ring-buffer records (numpy structured arrays) accumulate per stream; a flush turns
them into protobuf columns in a few vectorised numpy operations and encodes one batch.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import fleetscope.payload
from fleetscope import __version__
from fleetscope.codec import SCHEMA_MINOR, SCHEMAS, encode_batch
from fleetscope.v1 import batch_pb2
from node_agent.cgroups import IDENTITY_COLUMNS, CgroupResolver, empty_columns
from node_agent.columns import ColumnBuilder, boot_to_wall_offset_ns, padded_fit, padded_width

# RingBuffer.drain_with: (take, max_records) -> records consumed through take
Drain = Callable[[Callable[[np.ndarray], None], int], int]


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
    encoding: str = ""  # "": payload is the encoded batch; "lz4": an LZ4 frame of it (fleetscope/payload.py)
    trace_headers: tuple[tuple[str, bytes], ...] = ()  # W3C trace context (traceparent), set by the sink

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers: schema, batch id, the payload's encoding when it is compressed and,
        when the pipeline is traced, the W3C trace context of the agent's span for this
        batch, which the ingester continues."""
        return [
            ("fs-schema", f"fleetscope.v1.{self.stream};minor={SCHEMA_MINOR}".encode()),
            ("fs-batch-id", self.batch_id.encode()),
            *([(fleetscope.payload.ENCODING_HEADER, self.encoding.encode())] if self.encoding else []),
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


_GRAIN = 64  # narrowed fields widen in steps of this: few re-allocations


@functools.cache
def _opaque(dtype: np.dtype) -> np.dtype:
    """dtype with each array field (an address's u8[16]) as one opaque value of its size:
    numpy copies those with one memcpy per row, not byte by byte (~6x faster)."""
    assert dtype.fields is not None and dtype.names is not None
    fields = [dtype.fields[name] for name in dtype.names]
    formats = [np.dtype((np.void, f[0].itemsize)) if f[0].shape else f[0] for f in fields]
    return np.dtype({"names": list(dtype.names), "formats": formats, "offsets": [f[1] for f in fields],
                     "itemsize": dtype.itemsize})  # fmt: skip


def _target(column: np.ndarray) -> np.ndarray:
    """Where put() writes a column: itself, or for an array per row, its rows as opaque values."""
    if column.ndim == 1:
        return column
    return column.view(np.dtype((np.void, column.shape[1] * column.itemsize)))[:, 0]


@dataclass
class _Pending:
    """A batch being filled, column by column: one array per record field, allocated for the
    batch's row bound when it starts, so records are copied once (from the ring, field by
    field) and never concatenated, and the column builder and encoder read contiguous
    arrays. A narrowed char[N] field (Stream.narrow) is an 'S<w>' column, w its width."""

    columns: dict[str, np.ndarray]
    capacity: int
    rows: int = 0
    first_ns: int = 0
    targets: dict[str, np.ndarray] = dataclasses.field(init=False)  # the columns as put() writes them (_target)

    def __post_init__(self) -> None:
        self.targets = {name: _target(column) for name, column in self.columns.items()}

    @property
    def full(self) -> bool:
        return self.rows >= self.capacity

    def filled(self) -> dict[str, np.ndarray]:
        return {name: column[: self.rows] for name, column in self.columns.items()}

    def put(self, rec: np.ndarray) -> None:
        """Copy records (of the record dtype, may be a strided view of the ring) after the
        rows, field by field; a narrowed column keeps the first w bytes of its field."""
        src = rec.view(_opaque(rec.dtype))
        end = self.rows + len(rec)
        for name, target in self.targets.items():
            target[self.rows : end] = src[name]  # 'S<N>' into 'S<w>': the first w bytes
        self.rows = end

    def widen(self, name: str, width: int) -> None:
        """Make a narrowed column width bytes wide (its values NUL padded)."""
        column = self.columns[name]
        wider = np.zeros(self.capacity, f"S{width}")
        wider[: self.rows] = column[: self.rows]
        self.columns[name] = self.targets[name] = wider


class Batcher:
    """Accumulates records per stream and cuts batches at max rows, bytes or age.

    The byte bound is on the payload as shipped: the encoded batch, or with `compress` (fleet
    mode: Kafka messages) its LZ4 frame. It uses each stream's payload bytes per row learned
    from its last batch (dictionary encoding and compression make it far smaller than the
    fixed record); a batch whose payload is still over the bound is split in two, so no
    batch exceeds it.

    Every stream whose batch message has the identity columns (container_id, pod_uid, ...)
    gets them from its cgroup_id column here, whatever its probe: ids are resolved when
    records arrive (their cgroups may be gone by the time the batch is cut) and again,
    from the resolver's cache, per distinct id when the batch is encoded.
    """

    SAFETY = 1.25  # headroom on the learned bytes per row
    BUFFER_BYTES = 4 << 20  # a new batch's columns hold at most this many bytes (at the last batch's widths)

    def __init__(
        self,
        node: batch_pb2.NodeIdentity,
        builders: Mapping[str, ColumnBuilder],
        max_rows: int,
        max_bytes: int,
        max_age: float,
        identity: CgroupResolver | None = None,
        compress: bool = False,
    ) -> None:
        self.node = node
        self.compress = compress
        self.builders = builders
        self.identity = identity
        self.max_rows, self.max_bytes, self.max_age_ns = max_rows, max_bytes, int(max_age * 1e9)
        self.epoch = time.time_ns()
        self._seq: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        self._row_bytes: dict[str, float] = {}
        self._buffer_row: dict[str, int] = {}  # bytes per row of the stream's columns in its last batch

    def add(self, stream: str, records: np.ndarray) -> list[Batch]:
        """Take records (an array of the record dtype); returns the batches now full."""
        out = []
        pos = 0
        while pos < len(records):
            p = self._pending_for(stream, records.dtype)
            take = min(p.capacity - p.rows, len(records) - pos)
            self._put(stream, p, records[pos : pos + take])
            pos += take
            if p.full:
                out += self._cut(stream)
        return out

    def add_from(
        self, stream: str, dtype: np.dtype, drain: Drain, narrow: Sequence[tuple[str, str]] = ()
    ) -> tuple[int, list[Batch]]:
        """Records that drain(take, max_records) (RingBuffer.drain_with) hands to take as a view
        of the ring, copied field by field into the stream's pending batch until drain has no
        more: (records taken, batches now full). Full batches are encoded once drain has no
        more, so a ring is emptied before the encoding work, not held full during it.

        The char[N] fields in narrow (Stream.narrow) are batched only up to the widest value of
        the batch: an exec record is 1336 bytes, mostly the unused tail of its argv."""
        total, full = 0, list[_Pending]()
        take = functools.partial(self._take, stream, dtype, narrow)
        while True:
            p = self._pending.get(stream)
            n = drain(take, p.capacity - p.rows if p is not None else self._cap_rows(stream, dtype))
            total += n
            p = self._pending.get(stream)
            if p is None or not p.full:
                return total, [b for f in full for b in self._encode(stream, f.filled(), f.rows)]
            full.append(self._pending.pop(stream))

    def _take(self, stream: str, dtype: np.dtype, narrow: Sequence[tuple[str, str]], rec: np.ndarray) -> None:
        """Copy rec (as many records as the pending batch has room for) into it, its narrowed
        columns widened first where a value of rec does not fit."""
        p = self._pending.get(stream)
        need = {}
        for field, length in narrow:
            n = rec.dtype[field].itemsize
            w = p.columns[field].dtype.itemsize if p is not None else 0
            if length:
                used = min(int(rec[length].max()), n)
            elif w and (w == n or (w % 8 == 0 and padded_fit(rec[field], w))):
                used = w  # the batch's width holds them: no scan for the longest
            else:
                used = padded_width(rec[field])
            need[field] = n - (n - max(used, 1)) // _GRAIN * _GRAIN  # n - need: whole grains
        p = self._pending_for(stream, dtype, need)
        for field, width in need.items():
            if width > p.columns[field].dtype.itemsize:
                p.widen(field, width)
        self._put(stream, p, rec)

    def _cap_rows(self, stream: str, dtype: np.dtype) -> int:
        """The rows a new batch of the stream may hold."""
        # before the first batch, assume the worst: every byte of the record is encoded
        worst = dtype.itemsize + 4 * len(dtype.names or ())
        row_bytes = self._row_bytes.get(stream, worst)
        held = self.BUFFER_BYTES // self._buffer_row.get(stream, dtype.itemsize)  # narrowed: far below itemsize
        return max(1, min(self.max_rows, int(self.max_bytes / (row_bytes * self.SAFETY)), held))

    def _pending_for(self, stream: str, dtype: np.dtype, widths: Mapping[str, int] | None = None) -> _Pending:
        """The stream's batch being filled, or a new one sized to the rows a batch may hold
        (its narrowed char fields `widths` bytes wide)."""
        p = self._pending.get(stream)
        if p is None:
            cap = self._cap_rows(stream, dtype)
            widths = widths or {}
            columns = {
                name: np.empty(cap, f"S{widths[name]}" if name in widths else dtype[name]) for name in dtype.names or ()
            }
            p = self._pending[stream] = _Pending(columns, cap)
        return p

    def _put(self, stream: str, p: _Pending, rec: np.ndarray) -> None:
        """Append records to p."""
        if not len(rec):
            return
        if not p.rows:
            p.first_ns = time.monotonic_ns()
        at = p.rows
        p.put(rec)
        if self.identity is not None and "cgroup_id" in p.columns:
            self.identity.observe(p.columns["cgroup_id"][at : p.rows])

    def due(self, now_ns: int | None = None) -> list[Batch]:
        """Batches whose oldest row reached max age."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        old = [s for s, p in self._pending.items() if p.rows and now_ns - p.first_ns >= self.max_age_ns]
        return [b for s in old for b in self._cut(s)]

    def cut_now(self, stream: str, records: np.ndarray) -> list[Batch]:
        """Batches of exactly these records, now (for rows the agent makes itself)."""
        return self._encode(stream, {name: records[name] for name in records.dtype.names or ()}, len(records))

    def flush(self) -> list[Batch]:
        return [b for s in [s for s, p in self._pending.items() if p.rows] for b in self._cut(s)]

    @property
    def pending_rows(self) -> int:
        return sum(p.rows for p in self._pending.values())

    def batching(self, stream: str) -> int:
        """Rows of the stream read but not yet cut into a batch (at most batch_max_age old)."""
        p = self._pending.get(stream)
        return p.rows if p is not None else 0

    def _cut(self, stream: str) -> list[Batch]:
        p = self._pending.pop(stream)
        return self._encode(stream, p.filled(), p.rows)

    def _encode(self, stream: str, records: dict[str, np.ndarray], rows: int) -> list[Batch]:
        """Encode the records (one array per field) as batches, split while over max_bytes."""
        if rows:
            self._buffer_row[stream] = max(1, sum(c.nbytes for c in records.values()) // rows)
        columns = self.builders[stream](records, boot_to_wall_offset_ns())
        self._add_identity(stream, columns, rows)
        seq = self._seq.get(stream, 0) + 1
        batch_id = f"{self.node.machine_id}-{stream}-{self.epoch:x}-{seq}"
        created = time.time_ns()
        header = batch_pb2.BatchHeader(
            node=self.node, batch_id=batch_id, stream=stream, epoch=self.epoch, sequence=seq,
            created_ns=created, row_count=rows, schema_minor=SCHEMA_MINOR,
        )  # fmt: skip
        payload = encode_batch(SCHEMAS[stream], header, columns)
        if self.compress:
            payload = fleetscope.payload.compress(payload)
        if rows:
            learned = len(payload) / rows
            self._row_bytes[stream] = (self._row_bytes.get(stream, learned) + learned) / 2
        if len(payload) > self.max_bytes and rows > 1:
            half = rows // 2  # the sequence number was not taken: halves get seq, seq+1
            first, second = ({n: c[:half] for n, c in records.items()}, {n: c[half:] for n, c in records.items()})
            return self._encode(stream, first, half) + self._encode(stream, second, rows - half)
        self._seq[stream] = seq
        key, encoding = self.node.host_name.encode(), fleetscope.payload.LZ4 if self.compress else ""
        return [Batch(stream, batch_id, seq, rows, payload, key, created, encoding)]

    def _add_identity(self, stream: str, columns: dict[str, Any], rows: int) -> None:
        """Workload identity columns from cgroup_id, for streams whose message declares them."""
        names = {c.name for c in SCHEMAS[stream].columns}
        if "cgroup_id" not in columns or not names.issuperset(IDENTITY_COLUMNS):
            return
        ids = columns["cgroup_id"]
        identity = self.identity.columns(ids) if self.identity is not None else empty_columns(rows)
        for name, column in identity.items():
            columns.setdefault(name, column)
