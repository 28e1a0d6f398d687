"""A batch's Kafka message value: an LZ4 frame of the encoded batch when the message has the
header ``fs-encoding: lz4`` (agents compress each batch once, before their spool), otherwise
the encoded batch itself (older agents, other producers).

The frame is a standard one (``lz4 -d`` reads it) in LZ4's fast mode, with the content size
in its header and no content checksum: the spool record has a CRC-32, Kafka batches a CRC-32C.
"""

from __future__ import annotations

from collections.abc import Iterable

import lz4.frame

from fleetscope.codec import BatchDecodeError

ENCODING_HEADER = "fs-encoding"
LZ4 = "lz4"
ENCODINGS = (LZ4,)  # the fs-encoding values this version reads (no header: the raw batch)
LZ4_LEVEL = 0  # LZ4 frame compressionLevel < 3 is LZ4's fast mode; 3 and above is LZ4-HC (4-15x the CPU)


class PayloadError(BatchDecodeError):
    """A message value that does not unpack into an encoded batch (dead-lettered as malformed)."""


class PayloadTooLarge(PayloadError):
    """A message value that unpacks into more than the ingester's max_batch_bytes (oversized)."""


def compress(payload: bytes) -> bytes:
    """The Kafka message value for an encoded batch sent with ``fs-encoding: lz4``."""
    return lz4.frame.compress(payload, compression_level=LZ4_LEVEL, store_size=True, content_checksum=False)


def encoding_of(headers: Iterable[tuple[str, bytes]] | None) -> str | None:
    """The message's fs-encoding (None without the header); PayloadError if it has several."""
    found = [value for key, value in headers or () if key == ENCODING_HEADER]
    if len(found) > 1:
        raise PayloadError(f"{len(found)} {ENCODING_HEADER} headers, at most one is allowed")
    return found[0].decode("utf-8", "replace")[:64] if found else None


def unpack(value: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The encoded batch in a message value; never more than max_bytes of it in memory.

    PayloadTooLarge when it would exceed max_bytes, PayloadError for an unknown encoding or
    a corrupt, truncated or trailing-garbage LZ4 frame."""
    if encoding is None:
        return value
    if encoding != LZ4:
        known = ", ".join(ENCODINGS)
        raise PayloadError(f"{ENCODING_HEADER} {encoding!r} is unknown: this ingester reads {known} (or no header)")
    too_large = f"{ENCODING_HEADER} {LZ4}: a batch of {len(value)} bytes decompresses to more than max_batch_bytes"
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        declared = lz4.frame.get_frame_info(value)["content_size"]  # 0: not stored
        if declared > max_bytes:
            raise PayloadTooLarge(f"{too_large} {max_bytes} ({declared}, says its header)")
        # One byte more than allowed tells "too large" from "exactly that". The declared size
        # is checked by LZ4 at the end of the frame; as the bound it saves an oversized buffer
        # (decompressing into a max_batch_bytes buffer measured 1.5-2x slower).
        limit = min(declared or max_bytes, max_bytes)
        out = decompressor.decompress(value, max_length=limit + 1)
    except RuntimeError as e:  # python-lz4 reports LZ4F errors as RuntimeError
        raise PayloadError(f"{ENCODING_HEADER} {LZ4}: {e}") from None
    if len(out) > max_bytes:
        raise PayloadTooLarge(f"{too_large} {max_bytes}")
    if len(out) > limit:
        raise PayloadError(f"{ENCODING_HEADER} {LZ4}: the frame holds more than the {declared} bytes its header says")
    if not decompressor.eof:
        raise PayloadError(f"{ENCODING_HEADER} {LZ4}: truncated frame ({len(value)} bytes, {len(out)} decompressed)")
    if decompressor.unused_data:
        extra = len(decompressor.unused_data)
        raise PayloadError(f"{ENCODING_HEADER} {LZ4}: {extra} bytes after the end of the frame")
    return out


def unpack_message(value: bytes | None, headers: Iterable[tuple[str, bytes]] | None, max_bytes: int) -> bytes:
    """The encoded batch of a Kafka message (its value and headers); see unpack."""
    return unpack(value or b"", encoding_of(headers), max_bytes)
