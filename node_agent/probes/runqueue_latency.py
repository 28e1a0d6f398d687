"""The "runqueue_latency" probe: in-kernel log2 histograms of run queue wait per cgroup
from sched_wakeup, sched_wakeup_new and sched_switch (bpf/runqueue_latency.bpf.c)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from node_agent.columns import Records
from node_agent.probes import Histogram, Hook, Probe, ProbeSettings

__all__ = ["MAPS", "PROBE"]

MAPS = ("runqueue_latency_h0", "runqueue_latency_h1")  # generations (bpf/histogram.bpf.h)


def columns(rows: Records, offset_ns: int) -> dict[str, np.ndarray]:
    """Histogram rows -> RunqueueLatencyBatch columns."""
    return {
        "time": rows["time_ns"] + np.uint64(offset_ns),
        "interval_s": rows["interval_ns"] / 1e9,
        "cgroup_id": rows["cgroup_id"],
        "count": rows["count"],
        "sum_ns": rows["sum_ns"],
        "buckets": rows["buckets"],
    }


def map_sizes(settings: ProbeSettings) -> Mapping[str, int]:
    """Both generations hold up to histogram_max_keys cgroups."""
    return dict.fromkeys(MAPS, settings.histogram_max_keys)


PROBE = Probe(
    name="runqueue_latency",
    object_file="runqueue_latency.bpf.o",
    streams=(),
    histograms=(Histogram("runqueue_latency", MAPS, "runqueue_latency_key", 0, columns),),
    hooks=(
        # tp_btf only: sched_switch runs in prev's context, and the cgroup of the task
        # switched in is read from its struct; classic tracepoints carry only its pid
        Hook("sched/sched_wakeup", ("tp_btf__sched_wakeup",)),
        Hook("sched/sched_wakeup_new", ("tp_btf__sched_wakeup_new",)),
        Hook("sched/sched_switch", ("tp_btf__sched_switch",)),
    ),
    stats_map="runqueue_latency_stats",
    rodata=lambda _: {},
    map_sizes=map_sizes,
    bcc_unavailable="needs tp_btf: the waiting task's cgroup is read from sched_switch's struct "
    "task_struct *next (classic tracepoints carry only its pid), and bcc cannot attach tp_btf",
)
