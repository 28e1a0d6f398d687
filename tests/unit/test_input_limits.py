"""Every string and array from the wire has a bound: beyond it, truncated and counted, or
refused; never an allocation the sender chooses."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import AsyncIterator

import httpx2 as httpx
import lz4.frame
import numpy as np
import pytest

from fleetscope import codec, native
from fleetscope.codec import SCHEMAS, BatchDecodeError, decode_batch, encode_batch
from fleetscope.sqlserver.codecs import PIECE_BYTES, decoder
from fleetscope.v1 import batch_pb2, process_pb2
from ingester.enrich.bounded import BoundedTransport, ResponseTooLarge


def exit_batch(n: int, comm: tuple[bytes, list[int], list[int]]) -> bytes:
    """A process_exit batch of n rows whose comm column is (data, offsets, index)."""
    msg = process_pb2.ProcessExitBatch(
        header=batch_pb2.BatchHeader(stream="process_exit", batch_id="b-1", row_count=n, schema_minor=0)
    )
    for name in ("time", "pid", "ppid", "cgroup_id", "signal", "duration_ns", "exit_code"):
        getattr(msg, name).extend([1] * n)
    data, offsets, index = comm
    msg.comm.data = data
    msg.comm.offsets.extend(offsets)
    msg.comm.index.extend(index)
    return msg.SerializeToString()


def test_a_long_string_is_cut_and_counted() -> None:
    big = codec.MAX_STRING_BYTES
    data = b"a" * (big + 10) + b"short" + b"b" * (big * 2)
    offsets = [big + 10, big + 15, big * 3 + 15]
    out = decode_batch(SCHEMAS["process_exit"], exit_batch(4, (data, offsets, [0, 1, 2, 0])))
    values = out.columns["comm"].values
    assert values == [b"a" * big, b"short", b"b" * big]
    assert out.truncated == 3  # rows whose value was cut


def test_strings_repeated_over_many_rows_are_refused() -> None:
    rows = codec.MAX_EXPANDED_STRING_BYTES // codec.MAX_STRING_BYTES + 1
    data = b"x" * codec.MAX_STRING_BYTES
    with pytest.raises(BatchDecodeError, match="bytes of strings over the rows exceed"):
        decode_batch(SCHEMAS["process_exit"], exit_batch(rows, (data, [len(data)], [0] * rows)))


def test_a_dictionary_larger_than_the_rows_is_refused() -> None:
    n = codec.MAX_UNUSED_ENTRIES + 1
    with pytest.raises(BatchDecodeError, match="dictionary of 1025 entries for 2 rows"):
        decode_batch(SCHEMAS["process_exit"], exit_batch(2, (b"", [0] * n, [0, 0])))


def test_native_strings_gather_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_GATHER_BYTES", 100)  # many chunks, rows across their edges
    rng = np.random.default_rng(3)
    values = [bytes(rng.integers(97, 123, int(k)).astype(np.uint8)) for k in rng.integers(0, 300, 50)]
    offsets = np.cumsum([len(v) for v in values]).astype("<u4")
    index = rng.integers(0, len(values), 1000).astype("<u4")
    expected = b"".join(native._leb128(len(values[i])) + values[i] for i in index.tolist())
    assert native.strings(b"".join(values), offsets, index) == expected


def _bomb(name: str, size: int) -> bytes:
    zeros = bytes(1 << 20)
    if name == "gzip":
        c = zlib.compressobj(9, wbits=31)
        return b"".join(c.compress(zeros) for _ in range(size >> 20)) + c.flush()
    if name == "lz4":
        return lz4.frame.compress(bytes(size))
    return zlib.compress(bytes(size), 9)


@pytest.mark.parametrize("name", ["gzip", "deflate", "lz4"])
def test_a_decompression_bomb_comes_out_in_bounded_pieces(name: str) -> None:
    size = 64 << 20
    body = _bomb(name, size)
    assert len(body) < size // 200
    pieces = list(decoder(name).pieces(body))  # the whole compressed body in one feed
    assert max(len(p) for p in pieces) <= PIECE_BYTES
    assert sum(len(p) for p in pieces) == size


def test_gzip_members_still_decode_in_pieces() -> None:
    body = gzip.compress(b"a" * 3_000_000) + gzip.compress(b"b" * 10)
    d = decoder("gzip")
    out = list(d.pieces(body))
    d.finish()
    assert max(len(p) for p in out) <= PIECE_BYTES and b"".join(out) == b"a" * 3_000_000 + b"b" * 10


async def _get(transport: BoundedTransport, url: str) -> bytes:
    async with httpx.AsyncClient(transport=transport) as client, client.stream("GET", url) as resp:
        return b"".join([chunk async for chunk in resp.aiter_raw()])


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


@pytest.mark.parametrize(
    ("url", "parts", "ok"),
    [
        ("http://k/api/v1/pods?watch=true", [b'{"a":1}\n', b"x" * 60, b"y" * 39 + b"\n", b"z" * 99], True),
        ("http://k/api/v1/pods?watch=true", [b'{"a":1}\n', b"x" * 60, b"y" * 41], False),  # 101 without newline
        ("http://k/api/v1/pods", [b"x" * 60, b"y" * 40], True),
        ("http://k/api/v1/pods", [b"x" * 60, b"y" * 41], False),
    ],
)
async def test_kubernetes_responses_are_bounded(url: str, parts: list[bytes], ok: bool) -> None:
    exceeded = []
    inner = httpx.MockTransport(lambda request: httpx.Response(200, content=_chunks(parts)))
    transport = BoundedTransport(inner, lambda: exceeded.append(1), max_body=100, max_line=100)
    if ok:
        assert await _get(transport, url) == b"".join(parts)
        assert not exceeded
    else:
        with pytest.raises(ResponseTooLarge, match="more than 100 bytes from GET /api/v1/pods"):
            await _get(transport, url)
        assert exceeded == [1]


def test_encoder_and_decoder_agree_on_the_bounds() -> None:
    # what the agent writes always decodes: its longest string (argv) is far below the bound
    cols = {"comm": np.array([b"x" * 16] * 3), "filename": np.array([b"/bin/sh"] * 3),
            "args": np.array([b"a" * 1024] * 3)}  # fmt: skip
    dtypes = {c.name: c.dtype for c in SCHEMAS["process_exec"].columns}
    for name in ("time", "pid", "ppid", "uid", "cgroup_id", "argc", "args_truncated"):
        cols[name] = np.ones(3, dtypes[name])
    header = batch_pb2.BatchHeader(stream="process_exec", batch_id="b", row_count=3, schema_minor=codec.SCHEMA_MINOR)
    out = decode_batch(SCHEMAS["process_exec"], encode_batch(SCHEMAS["process_exec"], header, cols))
    assert out.truncated == 0 and out.columns["args"].values == [b"a" * 1024]
