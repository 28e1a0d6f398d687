"""The SQL interface's pieces: statement lexing, body codecs, and result framing held to the
engine's own whole-result output."""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from typing import Any

import brotli
import lz4.frame
import pyarrow as pa
import pytest
from chdb import _chdb

from fleetscope.sqlserver import sql
from fleetscope.sqlserver.codecs import DecodeError, Encoder, choose_encoding, decoder
from fleetscope.sqlserver.formats import NativeFramer, framer

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd


@pytest.mark.parametrize(
    "text, statement, fmt, data",
    [
        (b"INSERT INTO t (a, b) FORMAT Native\n\x02\x01", "INSERT INTO t (a, b) ", "Native", b"\x02\x01"),
        (b"insert into db.`format` FORMAT CSV\r\n1,2\n", "insert into db.`format` ", "CSV", b"1,2\n"),
        (b"INSERT INTO t VALUES (1, 'a')", "INSERT INTO t ", "Values", b" (1, 'a')"),
        (b"INSERT INTO t SETTINGS insert_deduplication_token = 'a''b' FORMAT JSONEachRow {\"a\": 1}",
         "INSERT INTO t SETTINGS insert_deduplication_token = 'a''b' ", "JSONEachRow", b'{"a": 1}'),
        (b"-- c\nINSERT INTO FUNCTION file('x.csv') (a) FORMAT TSV\n1", "-- c\nINSERT INTO FUNCTION file('x.csv') (a) ",
         "TSV", b"1"),
    ],
)  # fmt: skip
def test_insert_data_starts_after_the_format_name(text: bytes, statement: str, fmt: str, data: bytes) -> None:
    found = sql.split_insert(text, final=True)
    assert found is not None and (found.statement, found.fmt, text[found.data_start :]) == (statement, fmt, data)


def test_insert_split_waits_for_more_and_ignores_other_statements() -> None:
    for partial in (b"INSERT INTO t FORM", b"INSERT INTO t FORMAT CSV", b"INSERT INTO t SETTINGS a = 'x", b"INS"):
        with pytest.raises(sql.Incomplete):
            sql.split_insert(partial, final=False)
    for other in (b"SELECT 1", b"INSERT INTO t SELECT 1", b"INSERT INTO t WITH 1 AS x SELECT x", b"SHOW TABLES"):
        assert sql.split_insert(other, final=True) is None
    with pytest.raises(sql.SqlRefused, match="FROM INFILE"):
        sql.split_insert(b"INSERT INTO t FROM INFILE '/etc/passwd' FORMAT CSV", final=True)


@pytest.mark.parametrize(
    "text, first, fmt, totals",
    [
        (b"SELECT 1 FORMAT JSON", "SELECT", "JSON", False),
        (b"SELECT format FROM t", "SELECT", None, False),
        (b"SELECT 'FORMAT CSV', `format` FROM t /* FORMAT TSV */", "SELECT", None, False),
        (b"SELECT a FROM (SELECT 1 FORMAT CSV)", "SELECT", None, False),
        (b"SELECT 1 FORMAT `Arrow` SETTINGS max_threads = 1;", "SELECT", "Arrow", False),
        (b"(SELECT k, count() FROM t GROUP BY k WITH TOTALS) FORMAT TSV", "SELECT", "TSV", True),
        (b"# comment\nSHOW TABLES FORMAT JSONEachRow", "SHOW", "JSONEachRow", False),
    ],
)
def test_query_shape(text: bytes, first: str, fmt: str | None, totals: bool) -> None:
    assert sql.shape(text) == sql.QueryShape(first, fmt, totals)


def test_into_outfile_is_refused() -> None:
    with pytest.raises(sql.SqlRefused):
        sql.shape(b"SELECT 1 INTO OUTFILE '/tmp/x' FORMAT CSV")


def _compress(name: str, data: bytes) -> bytes:
    half = len(data) // 2  # two frames/streams, as clickhouse-connect sends per insert block
    one = {"gzip": gzip.compress, "deflate": zlib.compress, "zstd": zstd.compress, "lz4": lz4.frame.compress,
           "br": brotli.compress}[name]  # fmt: skip
    return one(data) if name == "deflate" else one(data[:half]) + one(data[half:])


@pytest.mark.parametrize("name", ["gzip", "deflate", "zstd", "lz4", "br"])
def test_request_bodies_decode_in_any_pieces(name: str) -> None:
    data = b"".join(b"%d\trow %d\n" % (i, i) for i in range(50000))
    body = _compress(name, data)
    d = decoder(name)
    out = b"".join(d.feed(body[i : i + 999]) for i in range(0, len(body), 999))
    d.finish()
    assert out == data
    truncated = decoder(name)
    truncated.feed(body[: len(body) // 4])
    with pytest.raises(DecodeError):
        truncated.finish()


@pytest.mark.parametrize("name", ["gzip", "deflate", "zstd", "lz4", "br"])
def test_response_streams_decode_whole(name: str) -> None:
    data = b"x" * 100000 + b"y" * 100000
    e = Encoder(name, 3)
    body = e.compress(data[:70000]) + e.compress(data[70000:]) + e.finish()
    whole = {"gzip": gzip.decompress, "deflate": zlib.decompress, "zstd": zstd.decompress,
             "lz4": lz4.frame.decompress, "br": brotli.decompress}[name]  # fmt: skip
    assert whole(body) == data


def test_accept_encoding() -> None:
    assert choose_encoding("lz4,zstd,br,gzip,deflate") == "lz4"
    assert choose_encoding("gzip;q=0, deflate") == "deflate"
    assert choose_encoding("identity") is None


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    conn = _chdb.connect(":memory:")  # type: ignore[attr-defined]
    yield conn
    conn.close()


QUERY = "SELECT number AS n, toString(number) AS s, [number] AS a FROM numbers(150000) SETTINGS max_block_size = 50000"


def streamed(conn: Any, query: str, fmt: str, revision: int = 0) -> bytes:
    """The engine's streaming chunks through the server's framer for fmt."""
    f = framer(fmt, revision)
    stream = conn.send_query(query, fmt)
    out = []
    while data := conn.streaming_fetch_result(stream).bytes():
        out.append(f.frame(data))
    out.append(f.finish())
    return b"".join(out)


@pytest.mark.parametrize(
    "fmt",
    ["Native", "RowBinary", "RowBinaryWithNamesAndTypes", "TabSeparated", "TSVWithNames", "TSVWithNamesAndTypes",
     "CSV", "CSVWithNames", "JSONEachRow", "JSONCompactEachRowWithNamesAndTypes", "Values"],
)  # fmt: skip
def test_streamed_rows_equal_the_engines_whole_result(engine: Any, fmt: str) -> None:
    assert streamed(engine, QUERY, fmt) == engine.query(QUERY, fmt).bytes()


@pytest.mark.parametrize("fmt", ["JSON", "JSONCompact", "JSONStrings"])
def test_streamed_json_is_one_document(engine: Any, fmt: str) -> None:
    got, want = json.loads(streamed(engine, QUERY, fmt)), json.loads(engine.query(QUERY, fmt).bytes())
    assert got["meta"] == want["meta"] and got["data"] == want["data"] and got["rows"] == want["rows"] == 150000
    empty = json.loads(streamed(engine, "SELECT 1 AS x WHERE 0", fmt))
    assert empty["data"] == [] and empty["rows"] == 0 and empty["meta"] == [{"name": "x", "type": "UInt8"}]


def test_streamed_csv_header_with_a_line_break_in_a_name(engine: Any) -> None:
    q = 'SELECT number AS "a\nb" FROM numbers(100000) SETTINGS max_block_size = 30000'
    rows = list(csv.reader(io.StringIO(streamed(engine, q, "CSVWithNames").decode())))
    assert rows[0] == ["a\nb"] and len(rows) == 100001


@pytest.mark.parametrize("fmt", ["Arrow", "ArrowStream"])
def test_streamed_arrow_is_one_table(engine: Any, fmt: str) -> None:
    body = streamed(engine, QUERY, fmt)
    table = (pa.ipc.open_stream(body) if fmt == "ArrowStream" else pa.ipc.open_file(body)).read_all()
    assert table.num_rows == 150000 and table.column("s").to_pylist()[-1] == "149999"


def _walk_revisioned(data: bytes, custom: bool) -> list[tuple[str, str]]:
    """Read Native with BlockInfo and custom-serialization bytes as clickhouse-go does;
    returns (name, type) of each column of each block, and checks each block's prefix."""
    from fleetscope.sqlserver.formats import _varint, _Walker

    cols, pos, walker = [], 0, _Walker(data)
    while pos < len(data):
        assert data[pos : pos + 8] == b"\x01\x00\x02\xff\xff\xff\xff\x00"
        pos += 8
        ncols, pos = _varint(data, pos)
        nrows, pos = _varint(data, pos)
        for _ in range(ncols):
            ln, pos = _varint(data, pos)
            name = data[pos : pos + ln].decode()
            pos += ln
            ln, pos = _varint(data, pos)
            type_name = data[pos : pos + ln].decode()
            pos += ln
            if custom:
                assert data[pos] == 0
                pos += 1
            if nrows:
                pos = walker.skip(type_name, pos + 8 * type_name.count("LowCardinality("), nrows)
            cols.append((name, type_name))
    assert pos == len(data)
    return cols


def test_native_for_a_client_protocol_revision(engine: Any) -> None:
    q = """SELECT number AS n, toString(number) AS s, toLowCardinality(toString(number % 10)) AS lc,
        [number, 1] AS arr, map('k', number) AS m, (number, 'x') AS tup, toNullable(number) AS nn,
        if(number % 2 = 0, NULL, toString(number)) AS ns, toDecimal64(number, 3) AS d,
        toDateTime64(number, 3, 'UTC') AS dt, toFixedString('ab', 2) AS fs,
        [toLowCardinality(toString(number % 3))] AS alc,
        toLowCardinality(toNullable(toString(number % 5))) AS lcn, NULL AS nul
        FROM numbers(120000) SETTINGS max_block_size = 50000"""  # fmt: skip
    plain = engine.query(q, "Native").bytes()
    for revision, custom in ((54405, False), (54483, True)):
        whole = NativeFramer(revision).frame(plain)  # several blocks in one buffer
        assert len(_walk_revisioned(whole, custom)) == 14 * 3
        assert len(_walk_revisioned(streamed(engine, q, "Native", revision), custom)) == 14 * 3
    assert NativeFramer(0).frame(plain) == plain
