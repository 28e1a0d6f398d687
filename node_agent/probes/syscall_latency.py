"""The "syscall_latency" probe: in-kernel log2 histograms of syscall latency per (cgroup,
syscall) from raw_syscalls:sys_enter/sys_exit (bpf/syscall_latency.bpf.c)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from node_agent.columns import Records
from node_agent.probes import Histogram, Hook, Probe, ProbeSettings
from node_agent.syscall_names import syscall_names

__all__ = ["MAPS", "PROBE"]

MAPS = ("syscall_latency_h0", "syscall_latency_h1")  # generations (bpf/histogram.bpf.h)


def columns(rows: Records, offset_ns: int) -> dict[str, np.ndarray]:
    """Histogram rows -> SyscallLatencyBatch columns; names resolved per batch (a take)."""
    return {
        "time": rows["time_ns"] + np.uint64(offset_ns),
        "interval_s": rows["interval_ns"] / 1e9,
        "cgroup_id": rows["cgroup_id"],
        "syscall_nr": rows["nr"],
        "syscall": syscall_names(rows["nr"]),
        "count": rows["count"],
        "sum_ns": rows["sum_ns"],
        "buckets": rows["buckets"],
    }


def map_sizes(settings: ProbeSettings) -> Mapping[str, int]:
    """Both generations hold up to histogram_max_keys (cgroup, syscall) pairs."""
    return dict.fromkeys(MAPS, settings.histogram_max_keys)


PROBE = Probe(
    name="syscall_latency",
    object_file="syscall_latency.bpf.o",
    streams=(),
    histograms=(Histogram("syscall_latency", MAPS, "syscall_latency_key", 0, columns),),
    hooks=(
        # hot hooks: raw_tp first (a classic tracepoint builds a perf record per syscall);
        # the classic twins serve loaders that only have tracepoints
        Hook("raw_syscalls/sys_enter", ("raw_tp__sys_enter", "tracepoint__raw_syscalls__sys_enter")),
        Hook("raw_syscalls/sys_exit", ("raw_tp__sys_exit", "tracepoint__raw_syscalls__sys_exit")),
    ),
    stats_map="syscall_latency_stats",
    rodata=lambda _: {},
    map_sizes=map_sizes,
    bcc_unavailable="no bcc variant written: the histogram map generations are switched through "
    "a .data global and read by the libbpf loader's map reader",
)
