"""Columnar batches per event kind, bounded by rows, bytes and age.

Raw ring-buffer records (numpy structured arrays) accumulate per stream; a flush turns
them into protobuf columns in a few vectorised numpy operations and encodes one batch.
"""

from __future__ import annotations

import functools
import platform
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """Records of one dtype copied as whole records: numpy copies a structured dtype field by
    field, a same-sized void dtype with one memcpy per run (about 2x faster)."""
    whole = np.dtype((np.void, src.dtype.itemsize))
    dst.view(whole)[:] = src.view(whole)


_GRAIN = 64  # narrowed fields widen in steps of this: few re-layouts, fields after them stay aligned


@dataclass(frozen=True)
class _Layout:
    """A record dtype whose char[N] fields `fields` are cut to `widths` bytes: the dtype of a
    batch buffer, and per byte range of the record it keeps, (source, destination) dtypes
    that view that range as one void field "b" (a strided memcpy per range)."""

    dtype: np.dtype
    fields: tuple[str, ...]
    widths: tuple[int, ...]
    ranges: tuple[tuple[np.dtype, np.dtype], ...]

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Records of the full dtype (src, may be a strided view of the ring) into dst."""
        for s, d in self.ranges:
            dst.view(d)["b"][...] = src.view(s)["b"]


def _layout(full: np.dtype, fields: Sequence[str], widths: Sequence[int]) -> _Layout:
    """full with each of fields cut to its width (the bytes after it dropped)."""
    assert full.fields is not None and full.names is not None
    cut = sorted(
        (full.fields[f][1] + w, full.fields[f][1] + full.fields[f][0].itemsize)
        for f, w in zip(fields, widths, strict=True)
    )
    kept, pos = [], 0
    for a, b in cut:
        kept.append((pos, a))
        pos = b
    kept.append((pos, full.itemsize))
    kept = [(a, b) for a, b in kept if b > a]

    def moved(offset: int) -> int:
        return offset - sum(b - a for a, b in cut if b <= offset)

    width = dict(zip(fields, widths, strict=True))
    size = full.itemsize - sum(b - a for a, b in cut)

    def one(offset: int, length: int, itemsize: int) -> np.dtype:
        return np.dtype({"names": ["b"], "formats": [f"V{length}"], "offsets": [offset], "itemsize": itemsize})

    dtype = np.dtype(
        {
            "names": list(full.names),
            "formats": [f"S{width[n]}" if n in width else full.fields[n][0] for n in full.names],
            "offsets": [moved(full.fields[n][1]) for n in full.names],
            "itemsize": size,
        }
    )
    ranges = tuple((one(a, b - a, full.itemsize), one(moved(a), b - a, size)) for a, b in kept)
    return _Layout(dtype, tuple(fields), tuple(widths), ranges)


@dataclass
class _Pending:
    """A batch being filled: records land in buf, allocated for the batch's row bound when
    it starts, so they are copied once (from the ring) and never concatenated. layout: the
    narrowed record dtype of buf (Batcher.add_narrowed), None for whole records."""

    buf: np.ndarray
    rows: int = 0
    first_ns: int = 0
    layout: _Layout | None = None

    @property
    def full(self) -> bool:
        return self.rows >= len(self.buf)


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
        pos = 0
        while pos < len(records):
            p = self._pending_for(stream, records.dtype)
            take = min(len(p.buf) - p.rows, len(records) - pos)
            _copy(p.buf[p.rows : p.rows + take], records[pos : pos + take])
            self._added(stream, p, take)
            pos += take
            if p.full:
                out += self._cut(stream)
        return out

    def add_from(self, stream: str, dtype: np.dtype, read: Callable[[np.ndarray], int]) -> tuple[int, list[Batch]]:
        """Records that read(out) copies straight into the stream's pending batch (read fills
        a prefix of out and says how many, e.g. RingBuffer.drain_into), until it has no more:
        (records taken, batches now full). Full batches are encoded once read() has no more,
        so a ring is emptied before the encoding work, not held full during it."""
        total, full = 0, list[_Pending]()
        while True:
            p = self._pending_for(stream, dtype)
            n = read(p.buf[p.rows :])
            self._added(stream, p, n)
            total += n
            if not p.full:
                return total, [b for f in full for b in self._encode(stream, f.buf[: f.rows])]
            full.append(self._pending.pop(stream))

    def add_narrowed(
        self, stream: str, dtype: np.dtype, narrow: Sequence[tuple[str, str]], drain: Drain
    ) -> tuple[int, list[Batch]]:
        """add_from for records whose char[N] fields in narrow (Stream.narrow) are batched only
        up to the widest value of the batch: drain(take, max_records) (RingBuffer.drain_with)
        hands take a view of the records, and only the bytes used are copied out of it (an
        exec record is 1336 bytes, mostly the unused tail of its argv)."""
        total, full = 0, list[_Pending]()
        take = functools.partial(self._take_narrowed, stream, dtype, narrow)
        while True:
            p = self._pending.get(stream)
            n = drain(take, len(p.buf) - p.rows if p is not None else self._cap_rows(stream, dtype))
            total += n
            p = self._pending.get(stream)
            if p is None or not p.full:
                return total, [b for f in full for b in self._encode(stream, f.buf[: f.rows])]
            full.append(self._pending.pop(stream))

    def _take_narrowed(self, stream: str, dtype: np.dtype, narrow: Sequence[tuple[str, str]], rec: np.ndarray) -> None:
        """Copy rec (full records, as many as the pending batch has room for) into it, its
        buffer re-laid out wider first if a value of rec does not fit."""
        p = self._pending.get(stream)
        have = p.layout.widths if p is not None and p.layout is not None else (0,) * len(narrow)
        need = []
        for (field, length), w in zip(narrow, have, strict=True):
            n = rec.dtype[field].itemsize
            if length:
                used = min(int(rec[length].max()), n)
            elif w and (w == n or (w % 8 == 0 and padded_fit(rec[field], w))):
                used = w  # the batch's width holds them: no scan for the longest
            else:
                used = padded_width(rec[field])
            need.append(n - (n - max(used, 1)) // _GRAIN * _GRAIN)  # n - need: whole grains
        if p is None:
            layout = _layout(dtype, [f for f, _ in narrow], need)
            p = self._pending[stream] = _Pending(np.empty(self._cap_rows(stream, dtype), layout.dtype), layout=layout)
        else:
            assert p.layout is not None, f"{stream}: whole records and narrowed ones in one batch"
            layout = p.layout
            if any(w > h for w, h in zip(need, layout.widths, strict=True)):
                layout = _layout(dtype, layout.fields, [max(w, h) for w, h in zip(need, layout.widths, strict=True)])
                buf = np.zeros(len(p.buf), layout.dtype)  # bytes a row did not use are NUL (or past its length)
                for name in dtype.names or ():
                    buf[name][: p.rows] = p.buf[name][: p.rows]
                p.buf, p.layout = buf, layout
        layout.copy(p.buf[p.rows : p.rows + len(rec)], rec)
        self._added(stream, p, len(rec))

    def _cap_rows(self, stream: str, dtype: np.dtype) -> int:
        """The rows a new batch of the stream may hold."""
        # before the first batch, assume the worst: every byte of the record is encoded
        worst = dtype.itemsize + 4 * len(dtype.names or ())
        row_bytes = self._row_bytes.get(stream, worst)
        return max(1, min(self.max_rows, int(self.max_bytes / (row_bytes * self.SAFETY))))

    def _pending_for(self, stream: str, dtype: np.dtype) -> _Pending:
        """The stream's batch being filled, or a new one sized to the rows a batch may hold."""
        p = self._pending.get(stream)
        if p is None:
            p = self._pending[stream] = _Pending(np.empty(self._cap_rows(stream, dtype), dtype))
        return p

    def _added(self, stream: str, p: _Pending, n: int) -> None:
        """n records were written to p.buf after its rows."""
        if not n:
            return
        if self.identity is not None and p.buf.dtype.names and "cgroup_id" in p.buf.dtype.names:
            self.identity.observe(p.buf["cgroup_id"][p.rows : p.rows + n])
        if not p.rows:
            p.first_ns = time.monotonic_ns()
        p.rows += n

    def due(self, now_ns: int | None = None) -> list[Batch]:
        """Batches whose oldest row reached max age."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        old = [s for s, p in self._pending.items() if p.rows and now_ns - p.first_ns >= self.max_age_ns]
        return [b for s in old for b in self._cut(s)]

    def cut_now(self, stream: str, records: np.ndarray) -> list[Batch]:
        """Batches of exactly these records, now (for rows the agent makes itself)."""
        pending = self._pending.pop(stream, None)
        self._pending[stream] = _Pending(records, len(records), time.monotonic_ns())
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
        return self._encode(stream, p.buf[: p.rows])

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
