"""Decode a batch and load it into ClickHouse as columns: the ingester's core, shared by
``fleetscope ingest`` (from Kafka) and ``fleetscope run`` (handed over in memory)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from clickhouse_connect.driver.client import Client

from fleetscope.codec import SCHEMAS, BatchDecodeError, DecodedBatch, StringColumn, decode_batch
from fleetscope.store import DATABASE, table_types

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


def _column(values: np.ndarray | StringColumn, ch_type: str) -> np.ndarray:
    if isinstance(values, StringColumn):
        return values.decoded()
    if ch_type.startswith("DateTime64"):
        return values.view("<i8")  # ns ticks; see store.set_write_format
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

    def insert(self, batch: DecodedBatch) -> Loaded:
        """Insert the rows, then the batch's record in fleet.batches, both deduplicated."""
        h = batch.header
        with self._lock:
            types = self._table_types(h.stream)
            names = [c for c in types if c == "node" or c in batch.columns]
            data: list[Any] = []
            for name in names:
                if name == "node":
                    data.append(np.full(batch.rows, h.node.host_name, dtype=object))
                else:
                    data.append(_column(batch.columns[name], types[name]))
            settings = {"insert_deduplication_token": h.batch_id}
            summary = self._client.insert(
                f"{DATABASE}.{h.stream}", data, column_names=names, column_oriented=True,
                column_type_names=[types[n] for n in names], settings=settings,
            )  # fmt: skip
            self._client.insert(
                f"{DATABASE}.batches",
                [[h.created_ns, h.node.host_name, h.node.machine_id, h.node.kernel_release,
                  h.node.agent_version, h.stream, h.epoch, h.sequence, h.batch_id, h.row_count]],
                column_names=["created", "node", "machine_id", "kernel_release", "agent_version",
                              "stream", "epoch", "sequence", "batch_id", "rows"],
                settings=settings,
            )  # fmt: skip
        return Loaded(batch, int(summary.written_rows))

    def insert_columns(self, table: str, columns: dict[str, np.ndarray]) -> None:
        """Insert columns the ingester made itself (its own counters) into fleet.<table>."""
        with self._lock:
            types = self._table_types(table)
            names = list(columns)
            data: list[Any] = [_column(columns[n], types[n]) for n in names]
            self._client.insert(
                f"{DATABASE}.{table}",
                data,
                column_names=names,
                column_oriented=True,
                column_type_names=[types[n] for n in names],
            )

    def close(self) -> None:
        with self._lock:
            self._client.close()
