"""Fast columnar codec for fleetscope batches: numpy arrays <-> protobuf wire bytes.

The column layout of every stream comes from the generated protobuf descriptors
(schemas/fleetscope/v1/batch.proto), so the .proto stays the one contract. Packed
fixed-width repeated fields are little-endian arrays on the wire: encoding a column is
``tag + varint(len) + ndarray.tobytes()`` and decoding is ``numpy.frombuffer``. Only the
header goes through the protobuf library (one object per batch, never per row).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from fleetscope import v1
from fleetscope.retry import first_line
from fleetscope.v1 import batch_pb2

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 2  # 1: the workload identity columns (fields 200-203, batch.proto); 2: process_exit's oom_* and
# signal_* columns, in_process_exit of oom_kills and fatal_signals (the join on the node, bpf/exit_join.bpf.h)

# Protobuf field type -> little-endian numpy dtype of its packed encoding.
_FIXED_DTYPES: dict[int, np.dtype] = {
    FieldDescriptor.TYPE_FIXED32: np.dtype("<u4"),
    FieldDescriptor.TYPE_SFIXED32: np.dtype("<i4"),
    FieldDescriptor.TYPE_FIXED64: np.dtype("<u8"),
    FieldDescriptor.TYPE_SFIXED64: np.dtype("<i8"),
    FieldDescriptor.TYPE_FLOAT: np.dtype("<f4"),
    FieldDescriptor.TYPE_DOUBLE: np.dtype("<f8"),
}
_WIRE_LEN = 2
_WIRE_VARINT, _WIRE_I64, _WIRE_I32 = 0, 1, 5

# Bounds on what a decoder accepts from the wire (hostile input must not allocate freely).
MAX_BATCH_BYTES = 64 << 20
MAX_ROWS = 1 << 20
MAX_HEADER_STRING = 1024
# A string value longer than this is cut to it and counted (DecodedBatch.truncated): the
# agent's longest is an argv of 1 KiB; nothing legitimate comes near.
MAX_STRING_BYTES = 64 << 10
# A string column's bytes once expanded to one value per row (what a ClickHouse String
# column holds): a few long entries repeated over many rows would otherwise make the
# ingester's Native block far larger than the message.
MAX_EXPANDED_STRING_BYTES = 128 << 20
MAX_UNUSED_ENTRIES = 1024  # dictionary entries allowed beyond the row count


class BatchDecodeError(ValueError):
    """A Kafka message is not a valid batch; the reason goes to the dead-letter topic."""

    retriable: ClassVar[bool] = False


@dataclass(frozen=True)
class Column:
    """One column of a stream: protobuf field number, name, and numpy dtype (None: string).

    per_row > 1 (the field option `per_row` of batch.proto) is a fixed-length array per
    row, flattened on the wire; decoded, it is a (rows, per_row) array. An omittable column
    (option `omittable`) may be absent from any batch: writers skip it, readers fill in zeros
    or "". A column added in a later minor (option `since_minor`) may be absent from batches
    whose header.schema_minor is lower, and is filled in the same way; from a batch of that
    minor or later its absence is truncation.
    """

    number: int
    name: str
    dtype: np.dtype | None
    per_row: int = 1
    omittable: bool = False
    since_minor: int = 0

    def may_be_absent(self, schema_minor: int) -> bool:
        """Whether a batch written at schema_minor may leave this column out."""
        return self.omittable or schema_minor < self.since_minor


@dataclass(frozen=True)
class StreamSchema:
    """Column layout of one event kind, read from its protobuf batch message."""

    stream: str
    message: type[Message]
    columns: tuple[Column, ...]

    @functools.cached_property
    def field_numbers(self) -> frozenset[int]:
        """The top-level fields a decoder keeps: the header and the columns."""
        return frozenset((1, *(c.number for c in self.columns)))

    @property
    def topic_suffix(self) -> str:
        return f"{self.stream}.v{SCHEMA_MAJOR}"


@dataclass
class StringColumn:
    """A dictionary-encoded string column, as on the wire: entry j is
    ``data[offsets[j-1]:offsets[j]]`` and row i is entry ``index[i]``."""

    data: bytes
    offsets: np.ndarray  # uint32 end offsets, one per dictionary entry
    index: np.ndarray  # uint32, one per row

    @property
    def values(self) -> list[bytes]:
        """The dictionary entries (one bytes object per distinct value)."""
        ends = self.offsets.tolist()
        return [self.data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=False)]

    def decoded(self) -> np.ndarray:
        """Object array of str per row; rows share the dictionary's objects (no per-row str)."""
        strs = np.array([v.decode("utf-8", "replace") for v in self.values] or [""], dtype=object)
        return strs[self.index]


def _schema_from_descriptor(stream: str, message: type[Message]) -> StreamSchema:
    desc: Descriptor = message.DESCRIPTOR
    columns = []
    for f in desc.fields:
        if f.name == "header":
            continue
        ext = f.GetOptions().Extensions
        absent = {"omittable": ext[batch_pb2.omittable], "since_minor": ext[batch_pb2.since_minor]}
        if f.message_type is not None and f.message_type.name == "StringColumn":
            columns.append(Column(f.number, f.name, None, **absent))
        elif f.type in _FIXED_DTYPES and f.is_repeated:
            columns.append(Column(f.number, f.name, _FIXED_DTYPES[f.type], ext[batch_pb2.per_row] or 1, **absent))
        else:
            raise TypeError(f"{desc.full_name}.{f.name}: columns must be packed fixed-width or StringColumn")
    return StreamSchema(stream, message, tuple(columns))


def _discover() -> dict[str, StreamSchema]:
    """Every ``<Stream>Batch`` message of the generated fleetscope.v1 modules, by stream
    name (``ProcessExecBatch`` -> ``process_exec``): adding a probe's .proto adds its streams."""
    schemas = {}
    for info in pkgutil.iter_modules(v1.__path__):
        module = importlib.import_module(f"{v1.__name__}.{info.name}")
        for name, desc in module.DESCRIPTOR.message_types_by_name.items():
            if name.endswith("Batch") and "header" in desc.fields_by_name:
                stream = re.sub(r"(?<!^)(?=[A-Z])", "_", name.removesuffix("Batch")).lower()
                schemas[stream] = _schema_from_descriptor(stream, getattr(module, name))
    return schemas


SCHEMAS: dict[str, StreamSchema] = _discover()


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


@functools.cache
def _tag(number: int) -> bytes:
    """The key of a length-delimited field."""
    return _varint((number << 3) | _WIRE_LEN)


def _ld(number: int, payload: bytes | np.ndarray) -> list[bytes | memoryview]:
    """A length-delimited field: tag, length, payload (bytes, or a C-contiguous little-endian
    array whose memory is joined as it is), as pieces to join once."""
    if isinstance(payload, np.ndarray):
        return [_tag(number), _varint(payload.nbytes), payload.data]
    return [_tag(number), _varint(len(payload)), payload]


def encode_strings(fixed: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Dictionary-encode a fixed-width bytes array ('S<n>', NUL padded) vectorised.

    Returns (data, offsets, index) as in the StringColumn message (see string_dictionary).
    """
    entries, index = string_dictionary(fixed)
    data, offsets = pack_strings(entries)
    return data, offsets, index


def string_dictionary(fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a fixed-width bytes array ('S<n>', NUL padded, may be a strided
    view) as 'S<n>' entries, and each row's entry (uint32 index).

    The dictionary is found by hashing each row 8 bytes at a time and finding the distinct
    64-bit hashes (integer work; sorting the strings themselves costs ~10x more). Every row
    is then checked byte for byte against its entry, so a hash collision cannot merge two
    values: it falls back to the string sort. Entries are in hash order, not sorted.
    """
    rows = len(fixed)
    width = fixed.dtype.itemsize
    if rows == 0:
        return np.zeros(0, fixed.dtype), np.zeros(0, "<u4")
    padded = -(-width // 8) * 8
    raw = np.empty((rows, padded), np.uint8)  # rows padded to whole words: one copy
    raw[:, width:] = 0
    # as opaque 'V<n>' items: one memcpy per row, not a loop over its bytes
    raw[:, :width].view(f"V{width}")[:, 0] = fixed.view(f"V{width}")
    words = raw.view("<u8")
    h = words[:, 0].copy()
    h *= _HASH_MUL
    h ^= h >> np.uint64(29)
    for j in range(1, words.shape[1]):
        h ^= words[:, j]
        h *= _HASH_MUL
        h ^= h >> np.uint64(29)
    # any row of a group of equal hashes can stand for it, as all rows are checked below
    distinct, index = distinct_values(h)
    first = np.empty(len(distinct), np.intp)
    first[index] = np.arange(rows)
    index = index.astype(np.uint32)
    # one word: each hash step is a bijection (xor, odd multiply, xorshift), so equal
    # hashes are equal values and there is nothing to check
    if words.shape[1] == 1 or np.array_equal(words, np.take(words, first[index], axis=0)):
        entries = raw[first, :width].view(f"S{width}").ravel()
    else:  # a collision: sort the strings
        entries, inverse = np.unique(fixed, return_inverse=True)
        index = inverse.astype("<u4").ravel()
    return entries, index.astype("<u4", copy=False)


def distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values of a 1-D integer array, sorted.

    Rows come in runs (a batch's events of one process, one cgroup), so they are looked for
    among the first row of each run only: np.unique sorts every row, and its hash table
    (numpy >= 2.3) costs about as much per row."""
    heads = values[np.flatnonzero(values[1:] != values[:-1]) + 1]
    return np.unique(np.concatenate((values[:1], heads)))


def distinct_values(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """distinct(values) and each row's index into them, by binary search: O(rows *
    log(distinct)) where np.unique(return_inverse=True) sorts every row."""
    found = distinct(values)
    return found, np.searchsorted(found, values)


def pack_strings(entries: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Dictionary entries ('S<n>', NUL padded) -> the StringColumn's data and end offsets."""
    width = entries.dtype.itemsize
    if len(entries) == 0:
        return b"", np.zeros(0, "<u4")
    view = entries.reshape(len(entries), 1).view(np.uint8)
    # numpy 'S' values have no trailing NULs, so the length is the last non-NUL + 1.
    nonzero = view != 0
    lengths = np.where(nonzero.any(axis=1), width - np.argmax(nonzero[:, ::-1], axis=1), 0)
    data = view[np.arange(width) < lengths[:, None]].tobytes()
    return data, np.cumsum(lengths, dtype="<u4")


_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)  # encode_strings' row hash: xor, multiply, shift


def encode_batch(schema: StreamSchema, header: batch_pb2.BatchHeader, columns: dict[str, np.ndarray]) -> bytes:
    """Encode one batch. Numeric columns are arrays of the column dtype; string columns are
    fixed-width bytes arrays ('S<n>') or pre-encoded (data, offsets, index) tuples; a column
    missing from `columns` that the header's schema_minor may leave out is left out, and so
    is an omittable string column that is "" in every row (readers fill that in: a host
    without containers sends no container ids)."""
    pieces: list[bytes | memoryview] = _ld(1, header.SerializeToString())
    for col in schema.columns:
        if col.name not in columns and col.may_be_absent(header.schema_minor):
            continue
        values = columns[col.name]
        if col.dtype is None:
            data, offsets, index = values if isinstance(values, tuple) else encode_strings(values)
            if col.omittable and not len(data):  # no bytes in any entry: "" in every row
                continue
            sub: list[bytes | memoryview] = []
            if len(data):
                sub += _ld(1, data)
            if len(offsets):
                sub += _ld(2, np.ascontiguousarray(offsets, "<u4"))
            if len(index):
                sub += _ld(3, np.ascontiguousarray(index, "<u4"))
            size = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in sub)
            pieces += [_tag(col.number), _varint(size), *sub]  # the StringColumn message, not joined apart
        elif len(values):
            if col.per_row > 1 and np.size(values) != header.row_count * col.per_row:
                raise ValueError(f"{col.name}: {np.size(values)} values, not {col.per_row} per row")
            pieces += _ld(col.number, np.ascontiguousarray(values, col.dtype))
    return b"".join(pieces)  # arrays join from their memory: one copy of each column


def _absent(col: Column, rows: int) -> np.ndarray | StringColumn:
    """A column the batch's writer left out: zeros, or "" in every row."""
    if col.dtype is None:
        return StringColumn(b"", np.zeros(1, "<u4"), np.zeros(rows, "<u4"))
    values = np.zeros(rows * col.per_row, col.dtype)
    return values.reshape(rows, col.per_row) if col.per_row > 1 else values


@dataclass
class DecodedBatch:
    """A decoded batch: header and one array (or StringColumn) per column."""

    header: batch_pb2.BatchHeader
    columns: dict[str, np.ndarray | StringColumn]
    truncated: int = 0  # string values (rows) cut to MAX_STRING_BYTES

    @property
    def rows(self) -> int:
        return self.header.row_count


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise BatchDecodeError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, wanted: frozenset[int]) -> dict[int, memoryview]:
    """The length-delimited fields of a message whose numbers are in `wanted` (last one wins,
    as in protobuf). Everything else is skipped, which is how unknown fields from newer
    minors pass, and a hostile message of many tiny fields costs no memory per field."""
    out: dict[int, memoryview] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise BatchDecodeError("field number 0")
        if wire == _WIRE_LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise BatchDecodeError(f"field {number} declares {length} bytes, {len(buf) - pos} left")
            if number in wanted:
                out[number] = buf[pos : pos + length]
            pos += length
        elif wire == _WIRE_VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire == _WIRE_I64:
            pos += 8
        elif wire == _WIRE_I32:
            pos += 4
        else:
            raise BatchDecodeError(f"field {number} has unsupported wire type {wire}")
    if pos != len(buf):
        raise BatchDecodeError("truncated fixed-width field")
    return out


def _array(raw: memoryview | None, dtype: np.dtype, rows: int, what: str) -> np.ndarray:
    if raw is None:
        arr = np.zeros(0, dtype)
    elif len(raw) % dtype.itemsize:
        raise BatchDecodeError(f"{what}: {len(raw)} bytes is not a multiple of {dtype.itemsize}")
    else:
        arr = np.frombuffer(raw, dtype)
    if rows >= 0 and len(arr) != rows:
        raise BatchDecodeError(f"{what}: {len(arr)} values for {rows} rows")
    return arr


_STRING_FIELDS = frozenset((1, 2, 3))  # StringColumn: data, offsets, index


def _check_header_strings(header: batch_pb2.BatchHeader) -> None:
    """Header strings become row values, stats keys and the deduplication token: bounded."""
    node = header.node
    for name, value in (("batch_id", header.batch_id), ("stream", header.stream), ("host_name", node.host_name),
                        ("machine_id", node.machine_id), ("kernel_release", node.kernel_release),
                        ("agent_version", node.agent_version)):  # fmt: skip
        if len(value) > MAX_HEADER_STRING:
            raise BatchDecodeError(f"header {name} of {len(value)} characters exceeds {MAX_HEADER_STRING}")


def decode_batch(schema: StreamSchema, payload: bytes, max_bytes: int = MAX_BATCH_BYTES) -> DecodedBatch:
    """Decode and validate one batch; raises BatchDecodeError with the reason, and nothing
    else whatever the bytes (tests/unit/test_codec_fuzz.py holds it to that)."""
    if len(payload) > max_bytes:
        raise BatchDecodeError(f"batch of {len(payload)} bytes exceeds {max_bytes}")
    fields = _fields(memoryview(payload), schema.field_numbers)
    header = batch_pb2.BatchHeader()
    try:
        header.ParseFromString(bytes(fields.get(1, b"")))
    except (DecodeError, RecursionError) as e:
        raise BatchDecodeError(f"header: {first_line(e)}") from None
    rows = header.row_count
    if rows > MAX_ROWS:
        raise BatchDecodeError(f"row_count {rows} exceeds {MAX_ROWS}")
    _check_header_strings(header)
    if header.stream != schema.stream:
        raise BatchDecodeError(f"header says stream {header.stream!r}, topic carries {schema.stream!r}")
    if not header.batch_id:
        raise BatchDecodeError("header has no batch_id")
    columns: dict[str, np.ndarray | StringColumn] = {}
    truncated = 0
    for col in schema.columns:
        raw = fields.get(col.number)
        if raw is None and rows and col.may_be_absent(header.schema_minor):
            columns[col.name] = _absent(col, rows)
            continue
        if col.dtype is not None:
            what = col.name if col.per_row == 1 else f"{col.name} ({col.per_row} per row)"
            values = _array(raw, col.dtype, rows * col.per_row, what)
            columns[col.name] = values.reshape(rows, col.per_row) if col.per_row > 1 else values
            continue
        sub = _fields(raw, _STRING_FIELDS) if raw is not None else {}
        data = bytes(sub.get(1, b""))
        offsets = _array(sub.get(2), np.dtype("<u4"), -1, f"{col.name}.offsets")
        index = _array(sub.get(3), np.dtype("<u4"), rows, f"{col.name}.index")
        if len(offsets) and (offsets[-1] != len(data) or np.any(np.diff(offsets.astype(np.int64)) < 0)):
            raise BatchDecodeError(f"{col.name}: dictionary offsets do not describe its data")
        if len(index) and int(index.max()) >= len(offsets):
            raise BatchDecodeError(f"{col.name}: index {int(index.max())} outside a dictionary of {len(offsets)}")
        # a writer stores each distinct value once: more entries than rows (beyond a few
        # unused ones) only make per-entry work (decoded(), enrichment) large
        if len(offsets) > max(rows, MAX_UNUSED_ENTRIES):
            raise BatchDecodeError(f"{col.name}: a dictionary of {len(offsets)} entries for {rows} rows")
        column, cut = _bounded_strings(col.name, data, offsets, index)
        columns[col.name] = column
        truncated += cut
    return DecodedBatch(header, columns, truncated)


def _bounded_strings(name: str, data: bytes, offsets: np.ndarray, index: np.ndarray) -> tuple[StringColumn, int]:
    """The column with entries longer than MAX_STRING_BYTES cut to it, and the rows cut;
    BatchDecodeError if its rows would expand beyond MAX_EXPANDED_STRING_BYTES."""
    lengths = np.diff(offsets.astype(np.int64), prepend=0)
    long = lengths > MAX_STRING_BYTES
    if long.any():
        # keep each entry's first MAX_STRING_BYTES bytes; at most len(data) / MAX_STRING_BYTES
        # entries are that long, so the loop is short and the mask one byte per data byte
        keep = np.ones(len(data), bool)
        for end, length in zip(offsets[long].tolist(), lengths[long].tolist(), strict=True):
            keep[end - length + MAX_STRING_BYTES : end] = False
        data = np.frombuffer(data, np.uint8)[keep].tobytes()
        lengths = np.minimum(lengths, MAX_STRING_BYTES)
        offsets = np.cumsum(lengths).astype("<u4")
    expanded = int(lengths[index].sum()) if len(index) and len(lengths) else 0
    if expanded > MAX_EXPANDED_STRING_BYTES:
        raise BatchDecodeError(f"{name}: {expanded} bytes of strings over the rows exceed {MAX_EXPANDED_STRING_BYTES}")
    cut = int(long[index].sum()) if long.any() and len(index) else 0
    return StringColumn(data, offsets, index), cut
