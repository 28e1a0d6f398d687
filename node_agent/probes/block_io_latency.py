"""The "block_io_latency" probe: in-kernel log2 histograms of block request latency per
(disk, operation) from block:block_rq_issue/block_rq_complete (bpf/block_io_latency.bpf.c)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from node_agent.columns import Records
from node_agent.probes import Histogram, Hook, Probe, ProbeSettings

__all__ = ["MAPS", "OPERATIONS", "PROBE", "device_names"]

MAPS = ("block_io_latency_h0", "block_io_latency_h1")  # generations (bpf/histogram.bpf.h)
# enum block_io_op in bpf/block_io_latency.h, by value
OPERATIONS = np.array([b"read", b"write", b"discard", b"flush", b"other"], "S8")
MINORBITS = 20  # kernel dev_t: major << 20 | minor
SYS_DEV_BLOCK = Path("/sys/dev/block")


@functools.lru_cache(maxsize=4096)
def _device_name(major: int, minor: int) -> bytes:
    """The kernel's name of a block device (DEVNAME in sysfs), else "MAJ:MIN"."""
    try:
        uevent = (SYS_DEV_BLOCK / f"{major}:{minor}" / "uevent").read_text()
    except OSError:
        return f"{major}:{minor}".encode()
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return line.removeprefix("DEVNAME=").encode()
    return f"{major}:{minor}".encode()


def device_names(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """Names ('S32') of a column of devices: sysfs is read once per distinct device."""
    devs = (major.astype(np.uint64) << np.uint64(32)) | minor
    uniq, inverse = np.unique(devs, return_inverse=True)
    names = [_device_name(int(d) >> 32, int(d) & 0xFFFFFFFF) for d in uniq.tolist()]
    return np.array(names, "S32")[inverse.ravel()] if len(devs) else np.zeros(0, "S32")


def columns(rows: Records, offset_ns: int) -> dict[str, np.ndarray]:
    """Histogram rows -> BlockIoLatencyBatch columns."""
    major = rows["dev"] >> np.uint32(MINORBITS)
    minor = rows["dev"] & np.uint32((1 << MINORBITS) - 1)
    return {
        "time": rows["time_ns"] + np.uint64(offset_ns),
        "interval_s": rows["interval_ns"] / 1e9,
        "dev_major": major,
        "dev_minor": minor,
        "device": device_names(major, minor),
        "operation": OPERATIONS[np.minimum(rows["op"], len(OPERATIONS) - 1)],
        "count": rows["count"],
        "sum_ns": rows["sum_ns"],
        "buckets": rows["buckets"],
    }


def map_sizes(settings: ProbeSettings) -> Mapping[str, int]:
    """Both generations hold up to histogram_max_keys (disk, operation) pairs."""
    return dict.fromkeys(MAPS, settings.histogram_max_keys)


PROBE = Probe(
    name="block_io_latency",
    object_file="block_io_latency.bpf.o",
    streams=(),
    histograms=(Histogram("block_io_latency", MAPS, "block_io_latency_key", 0, columns),),
    hooks=(
        # tp_btf first: keyed by the request pointer and no perf record per request; the
        # classic twins key by (dev, sector) for loaders that only have tracepoints
        Hook("block/block_rq_issue", ("tp_btf__block_rq_issue", "tracepoint__block__block_rq_issue")),
        Hook(
            "block/block_rq_complete",
            ("tp_btf__block_rq_complete", "tracepoint__block__block_rq_complete"),
        ),
    ),
    stats_map="block_io_latency_stats",
    rodata=lambda _: {},
    map_sizes=map_sizes,
    bcc_unavailable="no bcc variant written: the histogram map generations are switched through "
    "a .data global and read by the libbpf loader's map reader",
)
