"""Decode a batch and load it into ClickHouse as columns: the ingester's core, shared by
``fleetscope ingest`` (from Kafka) and ``fleetscope run`` (handed over in memory)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from clickhouse_connect.driver.client import Client

from fleetscope import native
from fleetscope.codec import SCHEMAS, BatchDecodeError, DecodedBatch, StringColumn, decode_batch
from fleetscope.store import qualified, table_types

log = logging.getLogger(__name__)

# ClickHouse type -> numpy dtype its numeric writer takes without per-element work.
_NUMPY_FOR = {
    "UInt8": "<u1", "UInt16": "<u2", "UInt32": "<u4", "UInt64": "<u8",
    "Int8": "<i1", "Int16": "<i2", "Int32": "<i4", "Int64": "<i8",
}  # fmt: skip


@dataclass(frozen=True)
class Loaded:
    """What one load did: the batch and whether ClickHouse reported it as a duplicate."""

    batch: DecodedBatch
    rows_written: int

    @property
    def duplicate(self) -> bool:
        return self.batch.rows > 0 and self.rows_written == 0


def _is_objects(values: native.Values) -> bool:
    return isinstance(values, np.ndarray) and values.dtype == object


def _column(values: native.Values, ch_type: str) -> np.ndarray:
    if isinstance(values, StringColumn):
        return values.decoded()
    if isinstance(values, native.MapColumn):  # only when another column needs this path: a dict per row
        keys, vals, ends = values.keys.decoded(), values.values.decoded(), values.offsets.tolist()
        maps = [dict(zip(keys[a:b], vals[a:b], strict=True)) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        out = np.empty(len(maps), dtype=object)
        out[:] = maps
        return out
    if isinstance(values, native.ArrayColumn):
        raise native.NativeTypeError(f"no fallback writer for {ch_type}")
    if ch_type.startswith("DateTime64"):
        return values.view("<i8")  # ns ticks; see store.set_write_format
    if ch_type == "IPv6":  # rows of 16 address bytes (the native writer takes them as they are)
        rows = np.ascontiguousarray(values).view(np.uint8).reshape(-1, 16)
        return np.array([bytes(r) for r in rows], dtype=object)
    return values.astype(_NUMPY_FOR.get(ch_type, values.dtype), copy=False)


class BatchLoader:
    """Inserts decoded batches column-wise with the batch id as deduplication token.

    Blocking (clickhouse-connect is synchronous): callers run it in a worker thread. One
    lock serialises use of the client, which the embedded engine requires.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._types: dict[str, dict[str, str]] = {}

    def _table_types(self, table: str) -> dict[str, str]:
        types = self._types.get(table)
        if types is None:
            types = self._types[table] = table_types(self._client, table)
        return types

    def decode(self, stream: str, payload: bytes) -> DecodedBatch:
        schema = SCHEMAS.get(stream)
        if schema is None:
            raise BatchDecodeError(f"unknown stream {stream!r}")
        return decode_batch(schema, payload)

    def insert(self, batch: DecodedBatch, extra: Mapping[str, native.Values] | None = None) -> Loaded:
        """Insert the rows in one insert, deduplicated on the batch id.

        Every row carries its batch's identity (batch_epoch, batch_sequence, batch_rows), so
        the rows are the record of the batch (view fleet.batches): a second insert per batch
        would cost the engine as much again. `extra` holds columns made for this batch in
        the ingester (the Kubernetes columns of ingester/enrich); they win over batch columns
        of the same name."""
        h, n = batch.header, batch.rows
        columns: dict[str, native.Values] = {**batch.columns, **extra} if extra else dict(batch.columns)
        columns["batch_epoch"] = np.full(n, h.epoch, "<u8")
        columns["batch_sequence"] = np.full(n, h.sequence, "<u8")
        columns["batch_rows"] = np.full(n, n, "<u4")
        with self._lock:
            names = [c for c in self._table_types(h.stream) if c == "node" or c in columns]
            values: dict[str, native.Values] = {c: columns[c] for c in names if c != "node"}
            values["node"] = native.constant_strings(h.node.host_name, n)
            written = self._insert(h.stream, values, n, {"insert_deduplication_token": h.batch_id})
        return Loaded(batch, written)

    def insert_columns(
        self, table: str, columns: Mapping[str, native.Values], rows: int | None = None, dedup_token: str = ""
    ) -> int:
        """Insert columns the ingester made itself (its counters, spans) into fleet.<table>;
        with a token, a repeated insert is deduplicated. Returns the rows written."""
        if rows is None:
            first = next(iter(columns.values()))
            assert isinstance(first, np.ndarray), "give rows= for columns that are not arrays"
            rows = len(first)
        settings = {"insert_deduplication_token": dedup_token} if dedup_token else {}
        with self._lock:
            return self._insert(table, dict(columns), rows, settings)

    def _insert(self, table: str, values: Mapping[str, native.Values], rows: int, settings: dict[str, str]) -> int:
        """One insert of whole columns; returns the rows ClickHouse wrote (0: deduplicated)."""
        types = self._table_types(table)
        names = list(values)
        if all(native.supported(types[n]) and not _is_objects(values[n]) for n in names):
            block = native.block([(n, types[n], values[n]) for n in names], rows)
            summary = self._client.raw_insert(qualified(table), names, block, settings=settings, fmt="Native")
        else:  # a type the native writer lacks: clickhouse-connect serialises it
            data: list[Any] = [_column(values[n], types[n]) for n in names]
            summary = self._client.insert(
                qualified(table), data, column_names=names, column_oriented=True,
                column_type_names=[types[n] for n in names], settings=settings,
            )  # fmt: skip
        return int(summary.written_rows)

    def ping(self) -> None:
        """Raise unless the server answers a query (an ingester waiting to rejoin its group)."""
        with self._lock:
            self._client.command("SELECT 1")

    def close(self) -> None:
        with self._lock:
            self._client.close()
