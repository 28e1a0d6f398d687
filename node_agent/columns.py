"""Vectorised conversions from ring-buffer records (numpy structured arrays) to batch
columns, shared by the probes' column builders. None of them loops over rows in Python."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

# A stream's column builder: (records, boot->wall clock offset ns) -> protobuf columns.
ColumnBuilder = Callable[[np.ndarray, int], dict[str, np.ndarray]]


def boot_to_wall_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_BOOTTIME: BPF stamps events with bpf_ktime_get_boot_ns()."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def c_strings(chars: np.ndarray) -> np.ndarray:
    """Fixed char[N] fields as 'S<N>' with everything after the first NUL zeroed.

    The ring buffer does not zero reserved records, so bytes after a C string's NUL can be
    leftovers of an older record; they must not reach the dictionary.
    """
    width = chars.dtype.itemsize
    raw = np.frombuffer(np.ascontiguousarray(chars).tobytes(), np.uint8).reshape(-1, width).copy()
    is_nul = raw == 0
    first_nul = np.where(is_nul.any(axis=1), np.argmax(is_nul, axis=1), width)
    raw[np.arange(width) >= first_nul[:, None]] = 0
    return raw.view(f"S{width}").ravel()


def argv_strings(args: np.ndarray, args_len: np.ndarray) -> np.ndarray:
    """argv copied as NUL-separated bytes -> 'S<N>' joined by spaces, bounded by args_len."""
    width = args.dtype.itemsize
    raw = np.frombuffer(np.ascontiguousarray(args).tobytes(), np.uint8).reshape(-1, width).copy()
    col = np.arange(width)
    used = np.minimum(args_len, width)[:, None]
    raw[col >= used] = 0
    # NULs between arguments become spaces; the last argument's own NUL stays a terminator
    raw[(col < used - 1) & (raw == 0)] = ord(" ")
    return raw.view(f"S{width}").ravel()
