"""Turn the engine's streamed result chunks into one valid response body per format.

chdb's streaming query hands out one chunk per result block, each encoded as a complete
document of the requested format. The engine does all the encoding; here the documents
are joined without touching rows:

- row formats (Native, RowBinary, TSV, CSV, JSONEachRow, ...) concatenate as they are;
- ``...WithNames``/``...WithNamesAndTypes`` keep the first chunk's header and cut it off
  the others;
- JSON, JSONCompact, JSONStrings, JSONCompactStrings keep the first chunk's ``meta`` and
  splice every chunk's ``data`` rows into one array, with the total in ``rows``;
- Arrow and ArrowStream are re-framed by pyarrow (record batches are passed through);
- Native for a client that sent ``client_protocol_version`` (clickhouse-go, Grafana) gets
  the block header that protocol revision expects (``NativeFramer``).

Any other format (Parquet, Pretty, XML, ...) is produced whole by the engine (``STREAMED``
tells which are streamed).
"""

from __future__ import annotations

import io
import re
import struct
from typing import Protocol

import pyarrow as pa

_PASS = {
    "Native", "RowBinary", "TabSeparated", "TSV", "TabSeparatedRaw", "TSVRaw", "Raw", "CSV",
    "JSONEachRow", "JSONLines", "JSONL", "NDJSON", "JSONStringsEachRow", "JSONCompactEachRow",
    "JSONCompactStringsEachRow", "TSKV", "LineAsString", "RawBLOB", "Null", "MsgPack", "BSONEachRow",
    "Values",
}  # fmt: skip
_HEADER_LINES = {
    "TabSeparatedWithNames": 1, "TSVWithNames": 1, "TabSeparatedRawWithNames": 1, "TSVRawWithNames": 1,
    "TabSeparatedWithNamesAndTypes": 2, "TSVWithNamesAndTypes": 2, "TabSeparatedRawWithNamesAndTypes": 2,
    "TSVRawWithNamesAndTypes": 2, "CSVWithNames": 1, "CSVWithNamesAndTypes": 2,
    "JSONCompactEachRowWithNames": 1, "JSONCompactEachRowWithNamesAndTypes": 2,
    "JSONCompactStringsEachRowWithNames": 1, "JSONCompactStringsEachRowWithNamesAndTypes": 2,
    "RowBinaryWithNames": 1, "RowBinaryWithNamesAndTypes": 2,
}  # fmt: skip
_JSON = {"JSON", "JSONStrings", "JSONCompact", "JSONCompactStrings"}
_ARROW = {"Arrow", "ArrowStream"}
STREAMED = frozenset(_PASS | set(_HEADER_LINES) | _JSON | _ARROW)


class FramingError(RuntimeError):
    """A chunk did not have the shape its format promises (an engine change?)."""


class Framer(Protocol):
    def frame(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


class _Pass:
    def __init__(self, separator: bytes = b"") -> None:
        self._sep, self._first = separator, True

    def frame(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._first:
            self._first = False
            return chunk
        return self._sep + chunk

    def finish(self) -> bytes:
        return b""


class _Header:
    """Keep the first chunk's header (names, types) and strip it from the following ones."""

    def __init__(self, fmt: str) -> None:
        self._lines = _HEADER_LINES[fmt]
        self._binary = fmt.startswith("RowBinary")
        self._csv = fmt.startswith("CSV")
        self._header: bytes | None = None

    def _header_len(self, chunk: bytes) -> int:
        if self._binary:  # varint n, then n names (and n types), each a varint-length string
            n, pos = _varint(chunk, 0)
            for _ in range(n * self._lines):
                ln, pos = _varint(chunk, pos)
                pos += ln
            return pos
        pos = 0
        for _ in range(self._lines):
            if self._csv:  # a line break inside quotes is part of a name
                quoted = False
                while pos < len(chunk):
                    c = chunk[pos]
                    pos += 1
                    if c == 0x22:
                        quoted = not quoted
                    elif c == 0x0A and not quoted:
                        break
            else:
                nl = chunk.find(b"\n", pos)
                pos = len(chunk) if nl < 0 else nl + 1
        return pos

    def frame(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._header is None:
            self._header = chunk[: self._header_len(chunk)]
            return chunk
        if not chunk.startswith(self._header):
            raise FramingError("a result chunk does not start with the result's header")
        return chunk[len(self._header) :]

    def finish(self) -> bytes:
        return b""


_DATA_OPEN = b'\n\t"data":\n\t[\n'
_DATA_CLOSE = b"\n\t]"
_ROWS = re.compile(rb'\n\t"rows": \d+,')


class _Json:
    """One JSON document from many: meta of the first, all data rows, tail of the last."""

    def __init__(self) -> None:
        self._opened = False
        self._rows = 0
        self._tail = b""
        self._any_rows = False

    def frame(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        start = chunk.find(_DATA_OPEN)
        end = chunk.find(_DATA_CLOSE, start + len(_DATA_OPEN) - 1) if start >= 0 else -1
        rows_match = _ROWS.search(chunk, max(end, 0))
        if start < 0 or end < 0 or rows_match is None:
            raise FramingError("a JSON result chunk has no data array")
        body = chunk[start + len(_DATA_OPEN) : end]
        self._rows += int(rows_match.group()[9:-1])
        self._tail = chunk[end:]
        out = b""
        if not self._opened:
            self._opened = True
            out = chunk[: start + len(_DATA_OPEN)]
        if body:
            out += (b",\n" if self._any_rows else b"") + body
            self._any_rows = True
        return out

    def finish(self) -> bytes:
        if not self._opened:
            return b""
        return _ROWS.sub(b'\n\t"rows": %d,' % self._rows, self._tail, count=1)


class _Arrow:
    """Record batches of every chunk into one Arrow file (or stream), written by pyarrow."""

    def __init__(self, stream: bool) -> None:
        self._stream = stream
        self._sink = io.BytesIO()
        self._writer: pa.ipc.RecordBatchFileWriter | pa.ipc.RecordBatchStreamWriter | None = None

    def _drain(self) -> bytes:
        out = self._sink.getvalue()
        self._sink.seek(0)
        self._sink.truncate()
        return out

    def frame(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        reader = pa.ipc.open_stream(chunk) if self._stream else pa.ipc.open_file(chunk)
        if self._writer is None:
            new = pa.ipc.new_stream if self._stream else pa.ipc.new_file
            self._writer = new(self._sink, reader.schema)
        if self._stream:
            for batch in reader:
                self._writer.write_batch(batch)
        else:
            for i in range(reader.num_record_batches):
                self._writer.write_batch(reader.get_batch(i))
        return self._drain()

    def finish(self) -> bytes:
        if self._writer is None:
            return b""
        self._writer.close()
        return self._drain()


def framer(fmt: str, protocol_revision: int) -> Framer:
    """The framer for a canonical output format name in STREAMED."""
    if fmt == "Native" and protocol_revision > 0:
        return NativeFramer(protocol_revision)
    if fmt in _HEADER_LINES:
        return _Header(fmt)
    if fmt in _JSON:
        return _Json()
    if fmt in _ARROW:
        return _Arrow(stream=fmt == "ArrowStream")
    return _Pass(b"," if fmt == "Values" else b"")


# --- Native for clients that speak a TCP protocol revision ------------------------------

# ClickHouse's NativeWriter, given client_protocol_version, writes a BlockInfo before each
# block (revision >= 51903) and a "has custom serialization" byte after each column's type
# (revision >= 54454). chdb writes revision 0 Native, so the framer inserts both: BlockInfo
# is a fixed 8 bytes; the per-column byte needs each column's extent, computed from its
# type (fixed-width columns by arithmetic, strings by walking their length prefixes).
REVISION_WITH_BLOCK_INFO = 51903
REVISION_WITH_CUSTOM_SERIALIZATION = 54454
_BLOCK_INFO = b"\x01\x00\x02\xff\xff\xff\xff\x00"  # is_overflows=0, bucket_num=-1, end

_FIXED = {
    "UInt8": 1, "Int8": 1, "Bool": 1, "Enum8": 1, "Nothing": 1,
    "UInt16": 2, "Int16": 2, "Date": 2, "Enum16": 2, "BFloat16": 2,
    "UInt32": 4, "Int32": 4, "Float32": 4, "DateTime": 4, "Date32": 4, "IPv4": 4, "Decimal32": 4, "Time": 4,
    "UInt64": 8, "Int64": 8, "Float64": 8, "DateTime64": 8, "Decimal64": 8, "Time64": 8,
    "UInt128": 16, "Int128": 16, "UUID": 16, "IPv6": 16, "Decimal128": 16,
    "UInt256": 32, "Int256": 32, "Decimal256": 32, "Point": 16,
}  # fmt: skip
_GEO_ARRAYS = {"Ring": 1, "LineString": 1, "Polygon": 2, "MultiLineString": 2, "MultiPolygon": 3}


class UnsupportedType(FramingError):
    """A column type whose Native layout the framer does not walk (JSON, Dynamic, ...)."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments of a type's parentheses."""
    out, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch in "'`\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return [a for a in out if a]


def _parse(type_name: str) -> tuple[str, list[str]]:
    name, paren, rest = type_name.strip().partition("(")
    return name.strip(), _split_args(rest[:-1]) if paren else []


def _element_type(arg: str) -> str:
    """Tuple elements may be named: ``a UInt8`` -> ``UInt8``."""
    head, sep, tail = arg.partition(" ")
    if sep and "(" not in head and tail.strip() and head.replace("_", "").isalnum():
        return tail.strip()
    return arg


def _count_low_cardinality(type_name: str) -> int:
    return type_name.count("LowCardinality(")


class _Walker:
    """Byte extent of Native column data, given its type and row count."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    def skip(self, type_name: str, pos: int, rows: int) -> int:
        if rows == 0:
            return pos
        name, args = _parse(type_name)
        width = _FIXED.get(name)
        if width is not None:
            return pos + rows * width
        if name == "Decimal":
            precision = int(args[0])
            return pos + rows * (4 if precision <= 9 else 8 if precision <= 18 else 16 if precision <= 38 else 32)
        if name.startswith("Interval"):
            return pos + rows * 8
        if name == "FixedString":
            return pos + rows * int(args[0])
        if name == "String":
            return self._strings(pos, rows)
        if name == "Nullable":
            return self.skip(args[0], pos + rows, rows)
        if name in ("Array", "Map") or name in _GEO_ARRAYS:
            inner = (
                f"Tuple({args[0]}, {args[1]})" if name == "Map"
                else args[0] if name == "Array"
                else "Array(" * (_GEO_ARRAYS[name] - 1) + "Point" + ")" * (_GEO_ARRAYS[name] - 1)
            )  # fmt: skip
            end = pos + rows * 8
            (total,) = struct.unpack_from("<Q", self.buf, end - 8)
            return self.skip(inner, end, total)
        if name == "Tuple":
            for arg in args:
                pos = self.skip(_element_type(arg), pos, rows)
            return pos
        if name == "LowCardinality":
            return self._low_cardinality(args[0], pos, rows)
        if name == "SimpleAggregateFunction":
            return self.skip(args[-1], pos, rows)
        raise UnsupportedType(f"Native output of {type_name} columns to a client protocol revision")

    def _strings(self, pos: int, rows: int) -> int:
        buf = self.buf
        for _ in range(rows):
            b = buf[pos]
            if b < 0x80:
                pos += 1 + b
            else:
                length, pos = _varint(buf, pos)
                pos += length
        return pos

    def _low_cardinality(self, inner: str, pos: int, rows: int) -> int:
        """Granules of (flags, [keys], indexes) until rows indexes were read."""
        name, args = _parse(inner)
        keys_type = args[0] if name == "Nullable" else inner
        done = 0
        while done < rows:
            (flags,) = struct.unpack_from("<Q", self.buf, pos)
            pos += 8
            if flags & (1 << 9):  # additional keys
                (n_keys,) = struct.unpack_from("<Q", self.buf, pos)
                pos = self.skip(keys_type, pos + 8, n_keys)
            (n_idx,) = struct.unpack_from("<Q", self.buf, pos)
            pos += 8 + n_idx * (1, 2, 4, 8)[flags & 0xFF]
            done += n_idx
        return pos


class NativeFramer:
    """Revision-0 Native blocks to the layout of a client's protocol revision."""

    def __init__(self, revision: int) -> None:
        self.revision = revision

    def frame(self, chunk: bytes) -> bytes:
        if not chunk or self.revision < REVISION_WITH_BLOCK_INFO:
            return chunk
        out, pos, walker = [], 0, _Walker(chunk)
        custom = self.revision >= REVISION_WITH_CUSTOM_SERIALIZATION
        while pos < len(chunk):
            out.append(_BLOCK_INFO)
            start = pos
            ncols, pos = _varint(chunk, pos)
            nrows, pos = _varint(chunk, pos)
            for _ in range(ncols):
                ln, pos = _varint(chunk, pos)
                pos += ln
                ln, pos = _varint(chunk, pos)
                type_name = chunk[pos : pos + ln].decode()
                pos += ln
                if custom:
                    out.append(chunk[start:pos])
                    out.append(b"\x00")
                    start = pos
                if nrows:
                    pos += 8 * _count_low_cardinality(type_name)  # state prefixes
                    pos = walker.skip(type_name, pos, nrows)
            out.append(chunk[start:pos])
        if pos != len(chunk):
            raise FramingError("a Native result chunk ends inside a block")
        return b"".join(out)

    def finish(self) -> bytes:
        return b""
