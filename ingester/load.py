"""Decode a batch and load it into ClickHouse as columns: the ingester's core, shared by
``fleetscope ingest`` (from Kafka) and ``fleetscope run`` (handed over in memory)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
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


BATCH_COLUMNS = ("batch_epoch", "batch_sequence", "batch_rows")  # the ingester's: every row's batch identity
Extra = Mapping[str, native.Values] | None  # columns the ingester made for a batch (Kubernetes identity)


@dataclass(frozen=True)
class Loaded:
    """What one load did with a batch: rows written, and whether it was stored already (left
    out, or deduplicated by ClickHouse on the insert's token)."""

    batch: DecodedBatch
    rows_written: int
    duplicate: bool = False


def _key(batch: DecodedBatch) -> tuple[str, int, int]:
    h = batch.header
    return h.node.host_name, h.epoch, h.sequence


def _token(batches: Sequence[DecodedBatch]) -> str:
    """The insert's deduplication token: a lone batch's id, else a digest of the ids."""
    if len(batches) == 1:
        return batches[0].header.batch_id
    return "g-" + hashlib.sha256("\n".join(b.header.batch_id for b in batches).encode()).hexdigest()[:40]


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

    def insert(self, batch: DecodedBatch, extra: Extra = None, check: bool = True) -> Loaded:
        """Insert one batch (see insert_group)."""
        return self.insert_group(batch.header.stream, [(batch, extra)], check)[0]

    def insert_group(
        self, stream: str, items: Sequence[tuple[DecodedBatch, Extra]], check: bool = True
    ) -> list[Loaded]:
        """Insert batches of one stream in one insert, each exactly once; a Loaded per item.

        One insert is one part for the engine to write and merge, which costs about as much
        for ten rows as for ten thousand, so the ingester stores what it has fetched together.
        Every row carries its batch's identity (batch_epoch, batch_sequence, batch_rows; also
        what the fleet.batches view reads), and batches whose rows are already in the table are
        left out: a redelivery after a crash or rebalance (regrouped, so an insert token alone
        would not match) or a copy the agent's spool sent again. The token (the batch id of a
        lone batch) still makes a retried insert that did reach the engine a no-op. `extra`
        columns win over batch columns of the same name. check=False skips the question (a
        query, ~5 ms in the embedded engine) where nothing can come twice: `fleetscope run`."""
        with self._lock:
            stored = self._stored(stream, [b for b, _ in items]) if check else {}
            out: list[Loaded | None] = [None] * len(items)
            todo: list[int] = []
            for i, (batch, _) in enumerate(items):
                key = _key(batch)
                have = stored.get(key, 0)
                if have >= batch.rows:  # stored already, or earlier in this group
                    out[i] = Loaded(batch, 0, duplicate=True)
                    continue
                if have:  # part of it: an insert cut short between its partitions' parts
                    log.warning("batch %s is stored in part (%d of %d rows): replacing it",
                                batch.header.batch_id, have, batch.rows)  # fmt: skip
                    self._delete(stream, key)
                stored[key] = batch.rows
                todo.append(i)
            blocks: dict[tuple[str, ...], list[int]] = {}
            values_of: dict[int, dict[str, native.Values]] = {}
            for i in todo:  # batches of older agents may lack columns: one insert per column set
                batch, extra = items[i]
                values = values_of[i] = self._values(stream, batch, extra)
                if not self._native(stream, values):  # a type the Native writer lacks: alone
                    written = self._insert(stream, values, batch.rows, {"insert_deduplication_token": _token([batch])})
                    out[i] = Loaded(batch, written, duplicate=written == 0)
                    continue
                blocks.setdefault(tuple(values), []).append(i)
            for names, members in blocks.items():
                batches = [items[i][0] for i in members]
                types = self._table_types(stream)
                body = b"".join(
                    native.block([(n, types[n], v) for n, v in values_of[i].items()], b.rows)
                    for i, b in zip(members, batches, strict=True)
                )  # consecutive Native blocks: the engine squashes them into one part
                summary = self._client.raw_insert(qualified(stream), list(names), body, fmt="Native",
                                                  settings={"insert_deduplication_token": _token(batches)})  # fmt: skip
                deduplicated = int(summary.written_rows) == 0
                for i, b in zip(members, batches, strict=True):
                    out[i] = Loaded(b, 0 if deduplicated else b.rows, duplicate=deduplicated)
        return [o for o in out if o is not None]

    def _values(self, stream: str, batch: DecodedBatch, extra: Extra) -> dict[str, native.Values]:
        """The batch's columns that the table has, with `node` and the batch identity."""
        h, n = batch.header, batch.rows
        columns: dict[str, native.Values] = {**batch.columns, **extra} if extra else dict(batch.columns)
        columns["batch_epoch"] = np.full(n, h.epoch, "<u8")
        columns["batch_sequence"] = np.full(n, h.sequence, "<u8")
        columns["batch_rows"] = np.full(n, n, "<u4")
        columns["node"] = native.constant_strings(h.node.host_name, n)
        return {c: columns[c] for c in self._table_types(stream) if c in columns}

    def _native(self, stream: str, values: Mapping[str, native.Values]) -> bool:
        types = self._table_types(stream)
        return all(native.supported(types[n]) and not _is_objects(v) for n, v in values.items())

    def _stored(self, stream: str, batches: Sequence[DecodedBatch]) -> dict[tuple[str, int, int], int]:
        """Rows already in the table per batch identity; reads the tables' per-batch projection."""
        keys = sorted({_key(b) for b in batches})
        rows = self._client.query(
            f"SELECT node, batch_epoch, batch_sequence, count() FROM {qualified(stream)} "
            "WHERE (node, batch_epoch, batch_sequence) IN {keys:Array(Tuple(String, UInt64, UInt64))} "
            "GROUP BY node, batch_epoch, batch_sequence",
            parameters={"keys": keys},
        ).result_rows
        return {(str(n), int(e), int(s)): int(c) for n, e, s, c in rows}

    def _delete(self, stream: str, key: tuple[str, int, int]) -> None:
        """Remove a batch's rows (a mutation, which also rebuilds the parts' projections)."""
        self._client.command(
            f"ALTER TABLE {qualified(stream)} DELETE WHERE node = {{n:String}} AND batch_epoch = {{e:UInt64}} "
            "AND batch_sequence = {s:UInt64}",
            parameters={"n": key[0], "e": key[1], "s": key[2]}, settings={"mutations_sync": 2},
        )  # fmt: skip

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
