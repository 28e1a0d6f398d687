"""glibc malloc settings for the long-running commands (agent, ingester, run, serve-sql).

Their buffers are large and short-lived: a batch's columns, its encoded payload and the
compressed copy are each hundreds of KiB to a few MiB, allocated and freed several times a
second. glibc serves blocks of that size with mmap(2) (its default threshold starts at
128 KiB) or trims them off the heap top as soon as they are freed, so every batch pays for
fresh pages: a page fault and a zeroed page per 4 KiB, in the process's CPU time (on the
agent's TCP storm about a tenth of its CPU; bench/agent_cost.py). Keeping freed memory in
the heap lets the next batch reuse it warm. Peak memory is unchanged (the heap keeps what
the peak touched, which VmHWM counts anyway); what is kept beyond is bounded by TRIM_BYTES.

The standard MALLOC_* environment variables and GLIBC_TUNABLES still win: when one is set,
nothing is changed here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20  # blocks below this come from the heap (32 MiB is glibc's maximum for it)
TRIM_BYTES = 64 << 20  # free memory at the heap top kept for reuse, not returned to the kernel
_ENV = ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_heap() -> bool:
    """Apply the settings above; False where the C library is not glibc or the user set their own."""
    if any(name in os.environ for name in _ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
    if not done:
        log.debug("mallopt refused the heap settings; glibc's defaults stay")
    return done
