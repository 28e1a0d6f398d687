"""HTTP body compression the way ClickHouse clients use it.

Requests: ``Content-Encoding`` gzip, deflate (zlib), zstd, lz4 (LZ4 frame format) and br,
decoded incrementally. clickhouse-connect compresses each insert block separately, so a
body is a series of frames or streams: the decoders restart after each one (for br through
libbrotlidec, Debian's libbrotli1, which curl already needs).
Responses: the first of the client's ``Accept-Encoding`` methods that we have, written as a
single stream flushed after every chunk so a streamed result reaches the client as it goes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import zlib
from collections.abc import Iterator
from typing import Any, Protocol

import brotli
import lz4.frame

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

ENCODINGS = ("lz4", "zstd", "br", "gzip", "deflate")
# Decompressed bytes per piece: a small compressed body can expand a thousandfold (a
# "zip bomb"), so no decoder ever produces more than this from one call, whatever it is fed.
PIECE_BYTES = 1 << 20


class DecodeError(ValueError):
    """The request body does not match its Content-Encoding."""


class Decoder(Protocol):
    def pieces(self, data: bytes) -> Iterator[bytes]:
        """The decompressed bytes data completes, in pieces of at most PIECE_BYTES."""
        ...

    def feed(self, data: bytes) -> bytes:
        """All of them at once (tests, small bodies)."""
        ...

    def finish(self) -> None: ...


class _Identity:
    def pieces(self, data: bytes) -> Iterator[bytes]:
        yield data  # as read from the network: bounded by the server's read buffer

    def feed(self, data: bytes) -> bytes:
        return data

    def finish(self) -> None:
        return None


class _Frames:
    """Concatenated frames of one codec: a fresh decompressor after each frame's end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._d: Any = self._new()
        self._started = False

    def _new(self) -> Any:
        if self.name == "gzip":
            return zlib.decompressobj(wbits=31)
        if self.name == "deflate":
            return zlib.decompressobj(wbits=15)
        if self.name == "zstd":
            return zstd.ZstdDecompressor()
        return lz4.frame.LZ4FrameDecompressor()

    def feed(self, data: bytes) -> bytes:
        return b"".join(self.pieces(data))

    def pieces(self, data: bytes) -> Iterator[bytes]:
        try:
            while data:
                self._started = True
                if self.name in ("gzip", "deflate"):
                    # zlib keeps what it did not get to in unconsumed_tail
                    while True:
                        out = self._d.decompress(data, PIECE_BYTES)
                        data = self._d.unconsumed_tail
                        if out:
                            yield out
                        if self._d.eof or (not data and len(out) < PIECE_BYTES):
                            break
                else:  # zstd, lz4: more output waits inside until needs_input
                    while True:
                        out = self._d.decompress(data, PIECE_BYTES)
                        data = b""
                        if out:
                            yield out
                        if self._d.eof or self._d.needs_input:
                            break
                if not self._d.eof:
                    break
                data = self._d.unused_data
                self._d, self._started = self._new(), False
        except (zlib.error, zstd.ZstdError, RuntimeError, OSError) as e:
            raise DecodeError(f"request body is not valid {self.name}: {e}") from None

    def finish(self) -> None:
        if self._started:
            raise DecodeError(f"request body ends inside a {self.name} frame (truncated upload?)")


class _BrotliFrames:
    """Concatenated brotli streams (clickhouse-connect writes one per insert block), through
    libbrotlidec's streaming call, which says where a stream ended: the brotli module does not."""

    _OUT = 1 << 20

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._state = lib.BrotliDecoderCreateInstance(None, None, None)
        self._started = False

    def feed(self, data: bytes) -> bytes:
        return b"".join(self.pieces(data))

    def pieces(self, data: bytes) -> Iterator[bytes]:
        lib = self._lib
        avail_in = ctypes.c_size_t(len(data))
        next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        buf = ctypes.create_string_buffer(self._OUT)
        while True:
            avail_out = ctypes.c_size_t(self._OUT)
            next_out = ctypes.cast(buf, ctypes.POINTER(ctypes.c_uint8))
            result = lib.BrotliDecoderDecompressStream(
                self._state, ctypes.byref(avail_in), ctypes.byref(next_in), ctypes.byref(avail_out),
                ctypes.byref(next_out), None,
            )  # fmt: skip
            if avail_out.value < self._OUT:
                yield buf.raw[: self._OUT - avail_out.value]
            if result == 0:
                raise DecodeError("request body is not valid br")
            if result == 1:  # this stream is complete; another may follow
                lib.BrotliDecoderDestroyInstance(self._state)
                self._state = lib.BrotliDecoderCreateInstance(None, None, None)
                self._started = False
                if avail_in.value == 0:
                    break
                continue
            self._started = True
            if result == 2:  # needs more input
                break

    def finish(self) -> None:
        if self._started:
            raise DecodeError("request body ends inside a br stream (truncated upload?)")

    def __del__(self) -> None:
        self._lib.BrotliDecoderDestroyInstance(self._state)


class _Brotli:
    """One brotli stream, when libbrotlidec is not installed."""

    def __init__(self) -> None:
        self._d = brotli.Decompressor()

    def feed(self, data: bytes) -> bytes:
        return b"".join(self.pieces(data))

    def pieces(self, data: bytes) -> Iterator[bytes]:
        try:
            out = self._d.process(data, output_buffer_limit=PIECE_BYTES)
            while True:
                if out:
                    yield bytes(out)
                if self._d.can_accept_more_data() or self._d.is_finished():
                    return
                out = self._d.process(b"", output_buffer_limit=PIECE_BYTES)
        except brotli.error as e:
            raise DecodeError(f"request body is not valid br (one brotli stream expected): {e}") from None

    def finish(self) -> None:
        if not self._d.is_finished():
            raise DecodeError("request body ends inside its brotli stream (truncated upload?)")


@functools.cache
def _libbrotlidec() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("brotlidec")
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    lib.BrotliDecoderCreateInstance.restype = ctypes.c_void_p
    lib.BrotliDecoderCreateInstance.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.BrotliDecoderDestroyInstance.argtypes = [ctypes.c_void_p]
    lib.BrotliDecoderDecompressStream.restype = ctypes.c_int
    lib.BrotliDecoderDecompressStream.argtypes = [ctypes.c_void_p] + [ctypes.c_void_p] * 5
    return lib


def decoder(content_encoding: str) -> Decoder:
    """A decoder for a Content-Encoding header value; DecodeError if we do not know it."""
    name = content_encoding.strip().lower()
    if name in ("", "identity", "none"):
        return _Identity()
    if name in ("gzip", "x-gzip"):
        return _Frames("gzip")
    if name in ("deflate", "zstd", "lz4"):
        return _Frames(name)
    if name == "br":
        lib = _libbrotlidec()
        return _BrotliFrames(lib) if lib is not None else _Brotli()
    raise DecodeError(f"unsupported Content-Encoding {content_encoding!r}; use one of {', '.join(ENCODINGS)}")


class Encoder:
    """One compressed response stream; ``compress`` flushes so each chunk is decodable."""

    def __init__(self, name: str, level: int) -> None:
        self.name = name
        self._c: Any
        if name == "gzip":
            self._c = zlib.compressobj(level, zlib.DEFLATED, 31)
        elif name == "deflate":
            self._c = zlib.compressobj(level, zlib.DEFLATED, 15)
        elif name == "zstd":
            self._c = zstd.ZstdCompressor(level=min(level, 19))
        elif name == "lz4":
            self._c = lz4.frame.LZ4FrameCompressor(auto_flush=True)
            self._head = self._c.begin()
        else:
            self._c = brotli.Compressor(quality=min(level, 11))

    def compress(self, data: bytes) -> bytes:
        if self.name in ("gzip", "deflate"):
            return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)
        if self.name == "zstd":
            return self._c.compress(data, zstd.ZstdCompressor.FLUSH_BLOCK)
        if self.name == "lz4":
            head, self._head = self._head, b""
            return head + self._c.compress(data)
        return bytes(self._c.process(data)) + bytes(self._c.flush())

    def finish(self) -> bytes:
        if self.name in ("gzip", "deflate"):
            return self._c.flush(zlib.Z_FINISH)
        if self.name == "zstd":
            return self._c.flush(zstd.ZstdCompressor.FLUSH_FRAME)
        if self.name == "lz4":
            head, self._head = self._head, b""
            return head + self._c.flush()
        return bytes(self._c.finish())


def choose_encoding(accept_encoding: str) -> str | None:
    """The first method in the client's Accept-Encoding that we can write (q=0 excluded)."""
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if name == "x-gzip":
            name = "gzip"
        if name in ENCODINGS and params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            return name
    return None
