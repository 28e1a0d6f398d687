"""Reader of in-kernel histograms (bpf/histogram.bpf.h): a stream whose rows come from
reading a BPF hash map every interval instead of draining a ring buffer.

The probe's programs add samples to one of two generations of per-CPU hash maps, chosen
by the global `hist_gen`. An interval ends with a flip: write the other generation into
`hist_gen`, wait until no program can still be adding to the old one, then read and delete
the old generation in bulk (BPF_MAP_LOOKUP_AND_DELETE_BATCH into numpy buffers, per-CPU
values summed with one numpy reduction). The wait is membarrier(MEMBARRIER_CMD_GLOBAL),
which is synchronize_rcu(): every BPF tracing program runs inside an RCU read section and
reads `hist_gen` in it, so after the wait every sample of the old generation is in its
map, and nothing is lost between read and reset. No Python object per key.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import platform
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np

from node_agent.libbpf import BpfObject, num_possible_cpus
from node_agent.probes import Histogram

__all__ = ["HIST_STRUCT", "HistogramReader", "collect", "row_dtype", "synchronize_programs", "take"]

log = logging.getLogger(__name__)

HIST_STRUCT = "hist"  # value of every histogram map (bpf/histogram.h)
GEN_MAP = ".data.hist_gen"  # the section holding `hist_gen`, its own single-value array map
_BATCH_BYTES = 4 << 20  # per-CPU values fetched per batch call: bounds the read buffer

# membarrier(2): MEMBARRIER_CMD_GLOBAL runs synchronize_rcu() (kernel/sched/membarrier.c);
# refused (EINVAL) on nohz_full kernels.
_MEMBARRIER_CMD_GLOBAL = 1
_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}
_FALLBACK_WAIT_S = 0.05  # programs run for microseconds; used only without membarrier

_lock = threading.Lock()  # one flip-and-read at a time (the agent's thread and its stop)
_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
_warned = False


def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    global _lib, _libc
    if _lib is None or _libc is None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        f = lib.bpf_map_lookup_and_delete_batch
        f.restype = ctypes.c_int
        # fd, in_batch, out_batch, keys, values, count (in: capacity, out: read), opts
        f.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.syscall.restype = ctypes.c_long
        _lib, _libc = lib, libc
    return _lib, _libc


def synchronize_programs() -> None:
    """Return once every BPF program running at the call has finished (synchronize_rcu)."""
    global _warned
    _, libc = _libs()
    nr = _SYS_MEMBARRIER.get(platform.machine())
    if nr is not None and libc.syscall(nr, _MEMBARRIER_CMD_GLOBAL, 0, 0) == 0:
        return
    if not _warned:
        _warned = True
        err = errno.errorcode.get(ctypes.get_errno(), "ENOSYS") if nr is not None else "unknown arch"
        log.warning(
            "membarrier(MEMBARRIER_CMD_GLOBAL) unavailable (%s, e.g. a nohz_full kernel): histogram "
            "intervals wait %.0f ms for running programs instead of an RCU grace period",
            err, _FALLBACK_WAIT_S * 1e3,
        )  # fmt: skip
    time.sleep(_FALLBACK_WAIT_S)


def row_dtype(key: np.dtype, slots: int) -> np.dtype:
    """A histogram row: the key's fields, then interval end and length, count, sum, buckets."""
    extra = ["time_ns", "interval_ns", "count", "sum_ns", "buckets"]
    names = list(key.names or ())
    if clash := set(names) & set(extra):
        raise ValueError(f"key struct fields {sorted(clash)} clash with the row's own fields")
    fields = [(n, key.fields[n][0]) for n in names]  # type: ignore[index]
    return np.dtype([*fields, *((n, "<u8") for n in extra[:-1]), ("buckets", "<u8", (slots,))])


class _GenerationMap:
    """One histogram stream's two maps, read with batch lookup-and-delete into numpy."""

    def __init__(self, obj: BpfObject, hist: Histogram, hist_dtype: np.dtype) -> None:
        self.hist = hist
        self.fds = (obj.map_fd(hist.maps[0]), obj.map_fd(hist.maps[1]))
        self.key_dtype = obj.btf.struct_dtype(hist.key)
        self.ncpus = num_possible_cpus()
        self.value_size = (hist_dtype.itemsize + 7) & ~7  # per-CPU slots are 8-byte aligned
        self.slots = hist_dtype["slots"].shape[0]
        self.dtype = row_dtype(self.key_dtype, self.slots)
        self.capacity = max(16, _BATCH_BYTES // (self.ncpus * self.value_size))  # keys per call

    def drain(self, gen: int) -> tuple[np.ndarray, np.ndarray]:
        """Read and delete every key of generation gen: (keys, per-key u64 [slots..., sum])."""
        lib, _ = _libs()
        fd = self.fds[gen]
        tokens = np.zeros(2, "<u8")  # in_batch, out_batch: the kernel's bucket position
        in_batch, out_batch = tokens.ctypes.data, tokens.ctypes.data + 8
        keys_out: list[np.ndarray] = []
        values_out: list[np.ndarray] = []
        capacity = self.capacity
        first = True
        while True:
            keys = np.empty(capacity, self.key_dtype)
            values = np.empty((capacity, self.ncpus, self.value_size // 8), "<u8")
            count = ctypes.c_uint32(capacity)
            ret = lib.bpf_map_lookup_and_delete_batch(
                fd, None if first else in_batch, out_batch,
                keys.ctypes.data, values.ctypes.data, ctypes.byref(count), None,
            )  # fmt: skip
            n = int(count.value)
            if n:
                keys_out.append(keys[:n])
                values_out.append(values[:n].sum(axis=1, dtype="<u8"))  # over CPUs
            if ret == -errno.ENOENT:  # the map is done (the last chunk may be empty)
                break
            if ret == -errno.ENOSPC and not n:  # one hash bucket holds more keys than fit
                capacity *= 2
                continue
            if ret < 0:  # never seen; keep what was read rather than fail the agent
                log.error("batch read of map %s failed: %s", self.hist.maps[gen], errno.errorcode.get(-ret, -ret))
                break
            tokens[0] = tokens[1]
            first = False
        if not keys_out:
            return np.empty(0, self.key_dtype), np.empty((0, self.value_size // 8), "<u8")
        return np.concatenate(keys_out), np.concatenate(values_out)

    def rows(self, gen: int, end_ns: int, interval_ns: int) -> np.ndarray:
        """Generation gen as rows of self.dtype (and the map emptied)."""
        keys, values = self.drain(gen)
        out = np.zeros(len(keys), self.dtype)
        for name in self.key_dtype.names or ():
            out[name] = keys[name]
        buckets = values[:, : self.slots]
        out["buckets"] = buckets
        out["count"] = buckets.sum(axis=1, dtype="<u8")
        out["sum_ns"] = values[:, self.slots]
        out["time_ns"] = end_ns
        out["interval_ns"] = interval_ns
        return out


class HistogramReader:
    """The histogram streams of one loaded probe object and its generation flag."""

    def __init__(self, obj: BpfObject, histograms: Sequence[Histogram]) -> None:
        """For a loaded obj; its first interval starts now."""
        self.obj = obj
        hist_dtype = obj.btf.struct_dtype(HIST_STRUCT)
        self.maps = [_GenerationMap(obj, h, hist_dtype) for h in histograms]
        self.gen = 0
        self.started_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self._set_gen(0)
        self._ready: list[tuple[str, np.ndarray]] = []  # rows read, not yet taken
        self._ready_lock = threading.Lock()

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(m.hist.name for m in self.maps)

    def _set_gen(self, gen: int) -> None:
        self.obj.update(GEN_MAP, struct.pack("<I", 0), struct.pack("<I", gen))

    def flip(self) -> tuple[int, int, int]:
        """Point the programs at the other generation; (old generation, end, length) ns."""
        old = self.gen
        self.gen ^= 1
        self._set_gen(self.gen)
        end = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        length, self.started_ns = end - self.started_ns, end
        return old, end, length

    def read(self, old: int, end_ns: int, interval_ns: int) -> list[tuple[str, np.ndarray]]:
        """Rows of every stream's generation old; call after synchronize_programs()."""
        return [(m.hist.name, m.rows(old, end_ns, interval_ns)) for m in self.maps]


def collect(readers: Sequence[HistogramReader]) -> None:
    """End the interval of every reader: flip all, wait once, read all; the rows wait in
    their reader for take(). Thread-safe and blocking for an RCU grace period (typically
    milliseconds): run it off the event loop. Rows of a call whose caller was cancelled
    are not lost; the next take() returns them."""
    with _lock:
        flips = [(r, r.flip()) for r in readers]
        synchronize_programs()
        for r, (old, end, length) in flips:
            rows = r.read(old, end, length)
            with r._ready_lock:
                r._ready.extend(rows)


def take(readers: Sequence[HistogramReader]) -> list[tuple[str, np.ndarray]]:
    """The rows collected so far, as (stream, rows) pairs, oldest first; never blocks long."""
    out = []
    for r in readers:
        with r._ready_lock:
            rows, r._ready = r._ready, []
        out += rows
    return out
