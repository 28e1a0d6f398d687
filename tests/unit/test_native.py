"""Native blocks built with numpy are what ClickHouse reads: round trips through chdb."""

from __future__ import annotations

import numpy as np
import pytest

from fleetscope import native
from fleetscope.codec import StringColumn, encode_strings
from fleetscope.store import connect


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    c = connect(f"chdb://{tmp_path_factory.mktemp('native')}")
    c.command("CREATE DATABASE IF NOT EXISTS fleet")
    yield c
    c.close()


def column(values: list[bytes]) -> StringColumn:
    data, offsets, index = encode_strings(np.array(values, dtype="S300"))
    return StringColumn(data, offsets, index)


def test_every_written_type_round_trips(client) -> None:
    rng = np.random.default_rng(3)
    n = 1000
    # lengths across the 1- and 2-byte LEB128 boundary, empty strings, a 300-key dictionary
    texts = [b"x" * int(k) for k in rng.integers(0, 300, n)]
    texts[:3] = [b"", b"a" * 127, b"b" * 128]
    lc = [f"comm{i % 300}".encode() for i in range(n)]
    client.command(
        "CREATE TABLE fleet.native_rt (t DateTime64(9, 'UTC'), u8 UInt8, i32 Int32, u64 UInt64, "
        "f Float64, s String, lc LowCardinality(String), a Array(UInt64)) ENGINE = MergeTree ORDER BY tuple()"
    )
    cols = [
        ("t", "DateTime64(9, 'UTC')", np.arange(n, dtype=np.uint64) + np.uint64(1_700_000_000 * 10**9)),
        ("u8", "UInt8", (np.arange(n) % 256).astype(np.uint8)),
        ("i32", "Int32", np.arange(n, dtype=np.int32) - 500),
        ("u64", "UInt64", np.full(n, 2**64 - 1, np.uint64)),
        ("f", "Float64", np.linspace(0, 1, n)),
        ("s", "String", column(texts)),
        ("lc", "LowCardinality(String)", column(lc)),
        ("a", "Array(UInt64)", np.arange(n * 4, dtype=np.uint64).reshape(n, 4)),
    ]
    assert all(native.supported(t) for _, t, _ in cols)
    client.raw_insert("fleet.native_rt", [c[0] for c in cols], native.block(cols, n), fmt="Native")
    rows = client.query("SELECT toUnixTimestamp64Nano(t), u8, i32, u64, f, s, lc, a FROM fleet.native_rt").result_rows
    assert len(rows) == n
    for i, r in enumerate(rows):
        assert r[0] == 1_700_000_000 * 10**9 + i and r[1] == i % 256 and r[2] == i - 500 and r[3] == 2**64 - 1
        assert r[5].encode() == texts[i] and r[6].encode() == lc[i] and r[7] == list(range(4 * i, 4 * i + 4))


def test_maps_and_variable_arrays_round_trip(client) -> None:
    """Map(LowCardinality(String), String), Map(String, String), Array(DateTime64),
    Array(LowCardinality(String)) and Array(Map(...)) with empty rows, as in fleet.otel_traces."""
    n = 300
    client.command(
        "CREATE TABLE fleet.native_maps (m Map(LowCardinality(String), String), s Map(String, String), "
        "`E.Timestamp` Array(DateTime64(9)), `E.Name` Array(LowCardinality(String)), "
        "`E.Attributes` Array(Map(LowCardinality(String), String)), k UInt32) ENGINE = MergeTree ORDER BY k"
    )
    # row i has i % 4 map entries and i % 3 array elements (some rows empty)
    want_maps = [{f"k{j}": f"v{i}-{j}" for j in range(i % 4)} for i in range(n)]
    entries = [(k, v) for m in want_maps for k, v in m.items()]
    offsets = np.cumsum([len(m) for m in want_maps]).astype(np.uint64)
    keys, values = column([k.encode() for k, _ in entries]), column([v.encode() for _, v in entries])
    m = native.MapColumn(offsets, keys, values)
    counts = np.arange(n) % 3
    ends = np.cumsum(counts).astype(np.uint64)
    total = int(ends[-1])
    times = np.arange(total, dtype=np.int64) + 1_700_000_000 * 10**9
    names = column([f"ev{j % 5}".encode() for j in range(total)])
    inner = native.MapColumn(np.arange(1, total + 1, dtype=np.uint64),
                             column([b"a"] * total), column([str(j).encode() for j in range(total)]))  # fmt: skip
    cols = [
        ("m", "Map(LowCardinality(String), String)", m),
        ("s", "Map(String, String)", m),
        ("E.Timestamp", "Array(DateTime64(9))", native.ArrayColumn(ends, times)),
        ("E.Name", "Array(LowCardinality(String))", native.ArrayColumn(ends, names)),
        ("E.Attributes", "Array(Map(LowCardinality(String), String))", native.ArrayColumn(ends, inner)),
        ("k", "UInt32", np.arange(n, dtype=np.uint32)),
    ]
    assert all(native.supported(t) for _, t, _ in cols)
    client.raw_insert("fleet.native_maps", [c[0] for c in cols], native.block(cols, n), fmt="Native")
    rows = client.query(
        "SELECT m, s, arrayMap(t -> toUnixTimestamp64Nano(t), `E.Timestamp`), `E.Name`, `E.Attributes` "
        "FROM fleet.native_maps ORDER BY k"
    ).result_rows
    start = 0
    for i, (got_m, got_s, got_t, got_n, got_a) in enumerate(rows):
        assert got_m == want_maps[i] and got_s == want_maps[i]
        idx = list(range(start, start + int(counts[i])))
        start += int(counts[i])
        assert got_t == [1_700_000_000 * 10**9 + j for j in idx]
        assert got_n == [f"ev{j % 5}" for j in idx]
        assert got_a == [{"a": str(j)} for j in idx]


def test_unsupported_types_are_refused() -> None:
    assert not native.supported("Map(String, UInt64)")
    with pytest.raises(native.NativeTypeError):
        native.column_bytes("Array(String)", np.zeros((1, 2)), 1)
    with pytest.raises(native.NativeTypeError):
        native.column_bytes("Nullable(String)", np.zeros(1), 1)


def test_constant_strings_fill_every_row() -> None:
    col = native.constant_strings("node-a", 3)
    assert col.decoded().tolist() == ["node-a"] * 3
