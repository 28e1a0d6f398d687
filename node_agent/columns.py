"""Vectorised conversions from ring-buffer records (numpy structured arrays) to batch
columns, shared by the probes' column builders. None of them loops over rows in Python."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

# Records of a batch, one array per field of the record struct (Batcher keeps them by column;
# a structured array of records reads the same way).
Records = Mapping[str, np.ndarray]
# A stream's column builder: (records, boot->wall clock offset ns) -> protobuf columns.
ColumnBuilder = Callable[[Records, int], dict[str, np.ndarray]]


def boot_to_wall_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_BOOTTIME: BPF stamps events with bpf_ktime_get_boot_ns()."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def c_strings(chars: np.ndarray) -> np.ndarray:
    """Fixed char[N] fields as 'S<M>' (M <= N: the longest string) with everything after
    the first NUL zeroed.

    The ring buffer does not zero reserved records, so bytes after a C string's NUL can be
    leftovers of an older record; they must not reach the dictionary.
    """
    view = _bytes2d(chars)
    first_nul = _first_nul(view)
    # only the longest string's bytes are copied: the result is 'S<longest>', not 'S<N>',
    # so the dictionary encoding downstream hashes and copies no padding
    used = max(int(first_nul.max(initial=0)), 1)
    raw = view[:, :used] * (np.arange(used) < first_nul[:, None])
    return raw.view(f"S{used}").ravel()


def padded_strings(chars: np.ndarray) -> np.ndarray:
    """Fixed char[N] fields that their BPF program NUL-pads (memset before
    bpf_probe_read_*_str, or bpf_get_current_comm) as 'S<M>' (M <= N: the longest string):
    the same values as c_strings, as a strided view of the records, with no per-row scan.

    With every string NUL-padded, a byte position that is NUL in every row is past the end
    of every string, so the longest ends at the first such position: an OR over the rows,
    8 bytes at a time, up to the longest string only.
    """
    view = _bytes2d(chars)
    used = max(padded_width(chars), 1)
    return view[:, :used].view(f"S{used}")[:, 0]


def padded_width(chars: np.ndarray) -> int:
    """The longest of NUL-padded char[N] fields (see padded_strings) in bytes: where
    padded_strings cuts them, found without a per-row scan."""
    view = _bytes2d(chars)
    width = view.shape[1]
    used = 0
    for j in range(0, width, 8):
        word = np.bitwise_or.reduce(_word(view, j), initial=0)
        if not word:
            break
        used = j + (int(word).bit_length() + 7) // 8  # the highest non-NUL byte of the word
    return used


def padded_fit(chars: np.ndarray, width: int) -> bool:
    """Whether NUL-padded char[N] fields all end within their first width bytes (a multiple
    of 8 below N): one word of each row tested, where padded_width scans up to the longest."""
    return not np.bitwise_or.reduce(_word(_bytes2d(chars), width), initial=0)


def _word(view: np.ndarray, j: int) -> np.ndarray:
    """Bytes j..j+7 of every row as little-endian uint64 (a partial last word NUL padded)."""
    width = view.shape[1]
    if j + 8 <= width:
        return view[:, j : j + 8].view("<u8")[:, 0]
    tail = np.zeros((len(view), 8), np.uint8)
    tail[:, : width - j] = view[:, j:]
    return tail.view("<u8")[:, 0]


def argv_strings(args: np.ndarray, args_len: np.ndarray) -> np.ndarray:
    """argv copied as NUL-separated bytes -> 'S<M>' joined by spaces, bounded by args_len
    (M <= N: the longest argv)."""
    width = args.dtype.itemsize
    # signed (used - 1 below) and narrow (int16 for an argv of up to 1 KiB): the (rows,
    # longest) comparisons below cost half of what they do in int64
    small = np.dtype(np.int16 if width < 1 << 15 else np.int64)
    used = np.minimum(args_len, width).astype(small)[:, None]
    longest = max(int(used.max(initial=0)), 1)  # copy and scan only up to the longest argv
    col = np.arange(longest, dtype=small)
    raw = _bytes2d(args)[:, :longest] & (col < used).view(np.uint8) * np.uint8(0xFF)
    # NULs between arguments become spaces; the last argument's own NUL stays a terminator
    raw |= ((col < used - small.type(1)) & (raw == 0)).view(np.uint8) * np.uint8(ord(" "))
    return raw.view(f"S{longest}").ravel()


def _bytes2d(chars: np.ndarray) -> np.ndarray:
    """A fixed-width bytes array ('S<N>', e.g. a field of the records, strided) as an
    (rows, N) uint8 view of the same memory: no copy."""
    return chars[:, None].view(np.uint8)


_ONES = np.uint64(0x0101010101010101)
_HIGHS = np.uint64(0x8080808080808080)


def _first_nul(view: np.ndarray) -> np.ndarray:
    """Index of each row's first NUL byte (the width if none), 8 bytes at a time, stopping
    once every row has one: a C string costs its length, not its field's width.

    (w - 0x01..01) & ~w & 0x80..80 flags the zero bytes of a little-endian word w; bytes
    above a zero byte may be flagged too (borrow), the lowest flag is always exact.
    """
    rows, width = view.shape
    first = np.full(rows, width, np.int64)
    pending = np.ones(rows, bool)
    for j in range(0, width, 8):
        if j + 8 <= width:
            word = view[:, j : j + 8].view("<u8")[:, 0]
        else:  # a partial last word, padded with non-NUL bytes
            tail = np.ones((rows, 8), np.uint8)
            tail[:, : width - j] = view[:, j:]
            word = tail.view("<u8")[:, 0]
        flags = (word - _ONES) & ~word & _HIGHS
        hit = pending & (flags != 0)
        if hit.any():
            f = flags[hit]
            lowest = f & (~f + np.uint64(1))
            first[hit] = j + (np.bitwise_count(lowest - np.uint64(1)) >> 3)
            pending &= ~hit
            if not pending.any():
                break
    return first


def coded_strings(codes: np.ndarray, names: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Small integer codes and their names ('S<n>' table indexed by code) -> a pre-encoded
    StringColumn (data, offsets, index) holding only the names present. A bincount instead
    of encode_strings' sort of the strings: O(rows); the dictionary for a set of codes is
    built once (a batch's codes are nearly always a set seen before)."""
    codes = np.minimum(codes, len(names) - 1).astype(np.intp)
    present = np.bincount(codes, minlength=len(names)) > 0
    data, offsets, remap = _code_dictionary(names, present.tobytes())
    return data, offsets, remap[codes]


_CODE_DICTIONARIES: dict[tuple[int, bytes], tuple[np.ndarray, bytes, np.ndarray, np.ndarray]] = {}
_CODE_DICTIONARIES_MAX = 1024


def _code_dictionary(names: np.ndarray, present: bytes) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The dictionary (data, offsets) of the names flagged in present (one bool per code),
    and each code's index into it; cached per (names table, codes present)."""
    key = (id(names), present)
    hit = _CODE_DICTIONARIES.get(key)
    if hit is not None and hit[0] is names:  # the id of a table still alive (it holds the reference)
        return hit[1], hit[2], hit[3]
    mask = np.frombuffer(present, bool)
    used = names[mask]
    lengths = np.char.str_len(used).astype("<u4")
    remap = (np.cumsum(mask) - 1).astype("<u4")
    entry = (names, b"".join(used.tolist()), np.cumsum(lengths, dtype="<u4"), remap)
    if len(_CODE_DICTIONARIES) >= _CODE_DICTIONARIES_MAX:
        _CODE_DICTIONARIES.clear()
    _CODE_DICTIONARIES[key] = entry
    return entry[1], entry[2], entry[3]
