"""Property-based fuzzing of the batch decoder: whatever the bytes, decode_batch returns a
consistent batch or raises BatchDecodeError, nothing else (no crash, no other exception, no
column whose length disagrees with row_count).

Three sources of input, each bounded so the whole test stays within a few seconds in CI:
random bytes; valid batches of every stream mutated (bytes flipped, cut, inserted, spliced,
varints made huge); and messages assembled field by field from the streams' own field
numbers, so the search reaches the column and dictionary checks rather than stopping at
the first bad tag.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetscope.codec import (
    SCHEMAS,
    BatchDecodeError,
    DecodedBatch,
    StreamSchema,
    StringColumn,
    decode_batch,
    encode_batch,
)
from fleetscope.v1 import batch_pb2

STREAMS = sorted(SCHEMAS)
EXAMPLES = 2000  # per test; bounded for CI
ASSEMBLED_EXAMPLES = 1000  # each draws many values: about as long as the other two together


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _valid(schema: StreamSchema, rows: int) -> bytes:
    """A valid batch of the stream with `rows` rows of small values."""
    h = batch_pb2.BatchHeader(stream=schema.stream, batch_id=f"m-{schema.stream}-1-1", epoch=1, sequence=1,
                              row_count=rows, schema_minor=1)  # fmt: skip
    h.node.host_name = "fuzz"
    cols: dict[str, np.ndarray] = {}
    for c in schema.columns:
        if c.dtype is None:
            cols[c.name] = np.array([b"a", b"bc", b""][: max(rows, 1)] * rows, dtype="S4")[:rows]
        else:
            cols[c.name] = np.arange(rows * c.per_row, dtype=c.dtype)
    return encode_batch(schema, h, cols)


SEEDS = {s: _valid(SCHEMAS[s], 3) for s in STREAMS}


def check(schema: StreamSchema, payload: bytes) -> None:
    """The property: a BatchDecodeError, or a batch whose every column fits row_count."""
    try:
        batch = decode_batch(schema, payload)
    except BatchDecodeError:
        return
    assert isinstance(batch, DecodedBatch)
    rows = batch.rows
    for col in schema.columns:
        values = batch.columns[col.name]
        if col.dtype is None:
            assert isinstance(values, StringColumn)
            assert len(values.index) == rows
            if rows:
                assert int(values.index.max()) < len(values.offsets)
            if len(values.offsets):
                assert int(values.offsets[-1]) == len(values.data)
            assert len(values.decoded()) == rows
        else:
            assert isinstance(values, np.ndarray)
            assert values.shape[0] == rows and values.size == rows * col.per_row


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.sampled_from(STREAMS), payload=st.binary(max_size=2048))
def test_random_bytes(stream: str, payload: bytes) -> None:
    check(SCHEMAS[stream], payload)


_mutation = st.tuples(
    st.sampled_from(["flip", "cut", "insert", "splice", "varint"]),
    st.integers(min_value=0, max_value=1 << 16),
    st.binary(min_size=1, max_size=16),
    st.integers(min_value=0, max_value=2**64 - 1),
)


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.sampled_from(STREAMS), mutations=st.lists(_mutation, min_size=1, max_size=6))
def test_mutated_valid_batches(stream: str, mutations: list[tuple[str, int, bytes, int]]) -> None:
    wire = bytearray(SEEDS[stream])
    for op, at, blob, big in mutations:
        pos = at % (len(wire) + 1)
        if op == "flip" and wire:
            wire[pos % len(wire)] ^= blob[0] or 1
        elif op == "cut":
            del wire[pos:]
        elif op == "insert":
            wire[pos:pos] = blob
        elif op == "splice":
            wire[pos:pos] = wire[: len(blob) * 4]
        else:  # a huge declared length or count at some position
            wire[pos:pos] = _varint(big)
    check(SCHEMAS[stream], bytes(wire))


@st.composite
def _assembled(draw: st.DrawFn) -> tuple[str, bytes]:
    """A message made of plausible fields: a header (often valid), columns with random
    lengths, string columns with random dictionaries and indices, and unknown fields."""
    stream = draw(st.sampled_from(STREAMS))
    schema = SCHEMAS[stream]
    # mostly a valid header and columns of the right length, so the search goes past them
    rows = draw(st.sampled_from([0, 1, 2, 3, 3, 3, 7, 8, 2**20, 2**32 - 1]))
    h = batch_pb2.BatchHeader(
        stream=draw(st.sampled_from([stream] * 6 + ["process_exec", ""])),
        batch_id=draw(st.sampled_from(["b-1"] * 6 + ["", "x" * 2000])),
        row_count=rows, schema_minor=draw(st.integers(0, 5)),
    )  # fmt: skip
    h.node.host_name = draw(st.text(max_size=8))
    out = [_varint(1 << 3 | 2), _varint(len(hb := h.SerializeToString())), hb]
    fit = min(rows, 8)
    odds = [True] * draw(st.sampled_from([0, 3, 40])) + [False]  # how rarely a column is made wrong
    columns = list(schema.columns) if draw(st.sampled_from(odds)) else []
    columns += draw(st.lists(st.sampled_from(schema.columns), max_size=2))
    for col in columns:
        right = draw(st.sampled_from(odds))
        if col.dtype is None:
            data = draw(st.binary(max_size=8))
            ends = [*sorted(draw(st.lists(st.integers(0, len(data)), max_size=4))), len(data)]
            offsets = ends if right else draw(st.lists(st.integers(0, 2**32 - 1), max_size=4))
            entry = st.integers(0, len(offsets) - 1 if right else 2**32 - 1)
            index = draw(st.lists(entry, min_size=fit, max_size=fit) if right else st.lists(entry, max_size=8))
            sub = _varint(1 << 3 | 2) + _varint(len(data)) + data if right or draw(st.booleans()) else b""
            if offsets and (right or draw(st.booleans())):
                raw = np.array(offsets, "<u4").tobytes()
                sub += _varint(2 << 3 | 2) + _varint(len(raw)) + raw
            if index and (right or draw(st.booleans())):
                raw = np.array(index, "<u4").tobytes() + (b"" if right else draw(st.binary(max_size=3)))
                sub += _varint(3 << 3 | 2) + _varint(len(raw)) + raw
            body = sub
        else:
            n = fit * col.per_row if right else draw(st.integers(0, 9))
            n = n * col.dtype.itemsize + (0 if right else draw(st.sampled_from([0, 1, 3])))
            body = draw(st.binary(min_size=n, max_size=n))
        out += [_varint(col.number << 3 | 2), _varint(len(body)), body]
    if draw(st.booleans()):  # unknown fields of every wire type, as a newer minor would add
        out += [_varint(150 << 3 | 0), _varint(draw(st.integers(0, 2**64 - 1))),
                _varint(151 << 3 | 1), b"\0" * 8, _varint(152 << 3 | 5), b"\0" * 4,
                _varint(153 << 3 | 2), _varint(3), b"abc"]  # fmt: skip
    return stream, b"".join(out)


@settings(max_examples=ASSEMBLED_EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_assembled())
def test_assembled_messages(case: tuple[str, bytes]) -> None:
    stream, payload = case
    check(SCHEMAS[stream], payload)


def test_many_tiny_unknown_fields_cost_no_memory_per_field() -> None:
    """Empty unknown fields (a 1 MB message holds 500k) are skipped, not kept: the decoder's
    peak memory does not grow with their number."""

    def peak(fields: int) -> int:
        payload = SEEDS["process_exit"] + (_varint(99 << 3 | 2) + b"\0") * fields
        tracemalloc.start()
        try:
            assert decode_batch(SCHEMAS["process_exit"], payload).rows == 3
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # 90k more fields kept at even 8 bytes each would be 720 KB more
    assert peak(100_000) - peak(10_000) < 64 << 10
