"""A batch's Kafka message value: the agent's LZ4 frame (fs-encoding: lz4) or the raw batch,
unpacked by the ingester within max_batch_bytes, and what the agent's Kafka sink spools."""

from __future__ import annotations

import os
import subprocess
import tracemalloc
from pathlib import Path

import lz4.frame
import pytest

from fleetscope import payload
from fleetscope.payload import PayloadError, PayloadTooLarge, unpack, unpack_message
from node_agent.batcher import Batch
from node_agent.shipper import KafkaSink

LZ4 = [("fs-schema", b"fleetscope.v1.process_exit;minor=2"), ("fs-encoding", b"lz4")]
BATCH = b"".join(i.to_bytes(8, "little") + b"\0" * 140 for i in range(5000))  # 148-byte rows, like tcp


def test_frames_round_trip_and_are_standard_lz4() -> None:
    value = payload.compress(BATCH)
    assert len(value) < len(BATCH) // 4
    assert unpack_message(value, LZ4, len(BATCH)) == BATCH  # exactly max_bytes is allowed
    info = lz4.frame.get_frame_info(value)
    assert info["content_size"] == len(BATCH) and not info["content_checksum"]
    assert lz4.frame.decompress(value) == BATCH
    lz4_tool = subprocess.run(["lz4", "-dc"], input=value, capture_output=True)
    if lz4_tool.returncode != 127:  # the lz4 command line tool, where installed
        assert lz4_tool.stdout == BATCH
    assert unpack_message(payload.compress(b""), LZ4, 100) == b""


def test_no_header_is_the_raw_batch() -> None:
    assert unpack_message(BATCH, [("fs-schema", b"fleetscope.v1.process_exit;minor=2")], 1) is BATCH
    assert unpack_message(None, None, 1) == b""


@pytest.mark.parametrize("cut", [0, 3, 7, 20, -1, -4, -5])
def test_a_truncated_frame_is_an_error_not_a_short_batch(cut: int) -> None:
    value = payload.compress(os.urandom(100_000))  # several blocks
    with pytest.raises(PayloadError, match=r"^fs-encoding lz4: ") as e:
        unpack_message(value[:cut], LZ4, 1 << 20)
    assert not isinstance(e.value, PayloadTooLarge)


def test_garbage_and_trailing_bytes_are_malformed() -> None:
    with pytest.raises(PayloadError, match=r"^fs-encoding lz4: .*frameType_unknown"):
        unpack_message(b"not an lz4 frame at all", LZ4, 1 << 20)
    with pytest.raises(PayloadError, match="3 bytes after the end of the frame"):
        unpack_message(payload.compress(BATCH) + b"xyz", LZ4, 1 << 20)


@pytest.mark.parametrize("store_size", [True, False])
def test_a_frame_decompressing_beyond_max_bytes_is_oversized_without_decompressing_it_all(store_size: bool) -> None:
    """With its size in the header (the agent's frames) or without (other writers)."""
    bomb = lz4.frame.compress(bytes(256 << 20), store_size=store_size)  # 256 MiB of zeros: ~1 MiB on the wire
    assert len(bomb) < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge, match=f"decompresses to more than max_batch_bytes {1 << 20}"):
            unpack(bomb, "lz4", 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated to reject it"
    value = lz4.frame.compress(BATCH, store_size=store_size)
    with pytest.raises(PayloadTooLarge):
        unpack_message(value, LZ4, len(BATCH) - 1)
    assert unpack_message(value, LZ4, len(BATCH)) == BATCH


@pytest.mark.parametrize("delta", [-10, 10])
def test_a_frame_whose_header_misstates_its_size_is_malformed(delta: int) -> None:
    header = lz4.frame.LZ4FrameCompressor(content_checksum=False).begin(source_size=len(BATCH) + delta)
    value = header + payload.compress(BATCH)[len(header) :]  # same flags, another content size
    with pytest.raises(PayloadError, match=r"^fs-encoding lz4: ") as e:
        unpack_message(value, LZ4, 1 << 20)
    assert not isinstance(e.value, PayloadTooLarge)


def test_unknown_and_repeated_encodings_are_malformed_and_say_what_is_read() -> None:
    with pytest.raises(PayloadError, match="fs-encoding 'zstd' is unknown: this ingester reads lz4"):
        unpack_message(BATCH, [("fs-encoding", b"zstd")], 1 << 20)
    with pytest.raises(PayloadError, match="2 fs-encoding headers"):
        unpack_message(payload.compress(BATCH), [("fs-encoding", b"lz4"), ("fs-encoding", b"lz4")], 1 << 20)


async def test_kafka_sink_spools_each_batch_compressed_once_with_its_encoding(tmp_path: Path) -> None:
    """What the agent spools (and then sends as it is) is the LZ4 frame and its header; a raw
    record an older agent left in the spool stays raw, without the header."""
    sink = KafkaSink(("127.0.0.1:1",), "fleetscope", tmp_path / "spool", 64 << 20)
    await sink.start()
    old = (("fs-schema", b"fleetscope.v1.process_exit;minor=2"), ("fs-batch-id", b"m-old"))
    try:
        sink.spool.append("process_exit", "m-old", 1, 1, 0, b"n", list(old), 1, BATCH)  # as an older agent did
        sink.submit(Batch("process_exit", "m-process_exit-1-2", 2, 5000, BATCH, b"n", 0))
        spooled = sink.spool.bytes
    finally:
        await sink.stop(0.1)
    assert spooled < 2 * len(BATCH)  # the raw record, plus about a seventh of it
    again = KafkaSink(("127.0.0.1:1",), "fleetscope", tmp_path / "spool", 64 << 20)
    again.spool.open()
    try:
        first, second = again.spool.next(), again.spool.next()
    finally:
        again.spool.close()
    assert first is not None and second is not None
    assert first.payload == BATCH and first.headers == old
    assert dict(second.headers)["fs-encoding"] == b"lz4" and lz4.frame.decompress(second.payload) == BATCH
    assert unpack_message(second.payload, second.headers, len(BATCH)) == BATCH
    assert unpack_message(first.payload, first.headers, len(BATCH)) == BATCH
