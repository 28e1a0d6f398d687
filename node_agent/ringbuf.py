"""Bulk reader of a BPF_MAP_TYPE_RINGBUF of fixed-size records, straight from its mmap.

A drain turns every committed record between the consumer and producer positions into
one numpy structured array: no libbpf callback and no Python object per record.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from types import TracebackType
from typing import Self

import numpy as np

from node_agent.errors import RingBufferError

__all__ = ["RingBuffer"]

# Ring buffer wire format (kernel/bpf/ringbuf.c, include/uapi/linux/bpf.h): page 0 holds
# consumer_pos (u64, the only page user space may write); page 1 holds producer_pos (u64);
# the data area follows, mapped twice back to back so a record that wraps past the end is
# contiguous. Positions are byte counters that only grow; offset = pos & (size - 1). Each
# record is an 8-byte header {u32 len, u32 pg_off} plus the payload, rounded up to 8.
_HDR_SIZE = 8
_BUSY = np.uint32(1 << 31)  # BPF_RINGBUF_BUSY_BIT: reserved, not yet submitted
_DISCARD = np.uint32(1 << 30)  # BPF_RINGBUF_DISCARD_BIT: discarded, skip it
_LEN_MASK = np.uint32((1 << 30) - 1)


class RingBuffer:
    """Reader of one ring buffer map whose records all have the dtype record_dtype."""

    def __init__(self, map_fd: int, max_entries: int, record_dtype: np.dtype) -> None:
        """Map the ring of map_fd (max_entries: its data size in bytes, a power of two)."""
        page = mmap.PAGESIZE
        if max_entries < page or max_entries & (max_entries - 1):
            raise ValueError(f"max_entries {max_entries}: must be a power of 2 >= {page}")
        self.map_fd = map_fd
        self.max_entries = max_entries
        self.dtype = np.dtype(record_dtype)
        self.stride = (_HDR_SIZE + self.dtype.itemsize + 7) & ~7
        if self.stride > max_entries:
            raise ValueError(f"a {self.stride}-byte record does not fit a {max_entries} ring")
        self._mask = max_entries - 1
        # header + payload + padding: the committed region is a strided array of these
        self._record = np.dtype(
            {
                "names": ["len", "pg_off", "payload"],
                # the payload as opaque bytes: copied with memcpy, not field by field
                "formats": ["<u4", "<u4", np.dtype((np.void, self.dtype.itemsize))],
                "offsets": [0, 4, _HDR_SIZE],
                "itemsize": self.stride,
            }
        )
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self._data_map = mmap.mmap(map_fd, page + 2 * max_entries, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError:
            self._cons_map.close()
            raise
        self._cons_pos = np.frombuffer(self._cons_map, "<u8", count=1)
        self._prod_pos = np.frombuffer(self._data_map, "<u8", count=1)
        self._data_off = page
        self._closed = False

    def fileno(self) -> int:
        """The map fd: poll()able, readable when the kernel woke the reader."""
        return self.map_fd

    def pending_bytes(self) -> int:
        """Bytes between the consumer and producer positions (reserved records included)."""
        return int(self._prod_pos[0]) - int(self._cons_pos[0])

    def drain(self, max_records: int | None = None) -> np.ndarray:
        """Consume committed records (at most max_records) and return their payloads."""
        payload, end = self._committed(max_records)
        out = np.empty(len(payload), self.dtype)  # owns its memory: nothing refers to the ring
        out.view(payload.dtype)[:] = payload
        del payload
        self._cons_pos[0] = end
        return out

    def drain_with(self, take: Callable[[np.ndarray], None], max_records: int) -> int:
        """Consume committed records (at most max_records) through take, which gets them as a
        view of the ring (record dtype, valid only during the call) and copies what it keeps;
        returns how many: the caller picks the bytes it copies (Batcher.add_from)."""
        payload, end = self._committed(max_records)
        n = len(payload)
        if n:
            take(payload.view(self.dtype))
        del payload
        self._cons_pos[0] = end
        return n

    def _committed(self, max_records: int | None) -> tuple[np.ndarray, int]:
        """The committed records' payloads (a view of the ring, discarded ones left out) and
        the consumer position after them; the caller copies them, then stores it."""
        if self._closed:
            raise ValueError("ring buffer is closed")
        # x86-64 is TSO: loads are not reordered with older loads and stores not with older
        # loads, so plain accesses in program order pair with the kernel's release stores
        # (producer_pos at reserve, the header's len at submit): read producer_pos, then
        # the headers, then copy payloads, and only then store consumer_pos. A weaker CPU
        # (arm64) would need acquire loads and a release store here.
        cons = int(self._cons_pos[0])
        avail = int(self._prod_pos[0]) - cons
        if avail <= 0:
            return np.empty(0, self._record)["payload"], cons
        if avail % self.stride:
            raise RingBufferError(
                f"ring fd {self.map_fd}: {avail} pending bytes are not whole "
                f"{self.stride}-byte records: a producer writes records of another size"
            )
        n = avail // self.stride
        if max_records is not None:
            n = min(n, max_records)
        records = np.frombuffer(self._data_map, self._record, count=n, offset=self._data_off + (cons & self._mask))
        # headers first, payloads after. The usual case, all committed and none discarded, in
        # one pass over the headers; a record seen committed stays so until consumed, so the
        # copy taken otherwise (of headers that may still change from busy to committed) is
        # what decides
        if (records["len"] == self.dtype.itemsize).all():
            return records["payload"], cons + n * self.stride
        lens = records["len"].copy()
        busy = (lens & _BUSY) != 0
        if busy.any():
            # a record still being written ends the committed region
            n = int(np.argmax(busy))
            records, lens = records[:n], lens[:n]
        keep = (lens & _DISCARD) == 0
        if np.any((lens[keep] & _LEN_MASK) != self.dtype.itemsize):
            raise RingBufferError(
                f"ring fd {self.map_fd}: record length is not {self.dtype.itemsize} bytes: "
                "the dtype does not match the probe object (rebuild with `make -C bpf`)"
            )
        payload = records["payload"] if keep.all() else records["payload"][keep]
        return payload, cons + n * self.stride

    def close(self) -> None:
        """Unmap the ring; the map fd stays open (its BpfObject owns it)."""
        if self._closed:
            return
        self._closed = True
        del self._cons_pos, self._prod_pos
        self._cons_map.close()
        self._data_map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
