"""The "oom_kills" probe: OOM killer victims with their memory figures (bpf/oom_kills.bpf.c)."""

from __future__ import annotations

import mmap
from collections.abc import Mapping

import numpy as np

from node_agent.columns import c_strings
from node_agent.probes import Hook, Probe, ProbeSettings, Stream

__all__ = ["PROBE"]


def rodata(settings: ProbeSettings) -> Mapping[str, int | bytes]:
    """The probe's const volatile knobs: the page size, to turn mm counters into KiB."""
    return {"page_shift": mmap.PAGESIZE.bit_length() - 1}


def columns(rec: np.ndarray, offset_ns: int) -> dict[str, np.ndarray]:
    """oom_kills_event records -> OomKillsBatch columns."""
    return {
        "time": rec["time_ns"] + np.uint64(offset_ns),
        "pid": rec["pid"],
        "uid": rec["uid"],
        "cgroup_id": rec["cgroup_id"],
        "comm": c_strings(rec["comm"]),
        "total_vm_kb": rec["total_vm_kb"],
        "anon_rss_kb": rec["anon_rss_kb"],
        "file_rss_kb": rec["file_rss_kb"],
        "shmem_rss_kb": rec["shmem_rss_kb"],
        "pgtables_kb": rec["pgtables_kb"],
        "oom_score_adj": rec["oom_score_adj"].astype("<i4"),
        "trigger_pid": rec["trigger_pid"],
        "trigger_comm": c_strings(rec["trigger_comm"]),
        "trigger_cgroup_id": rec["trigger_cgroup_id"],
    }


PROBE = Probe(
    name="oom_kills",
    object_file="oom_kills.bpf.o",
    streams=(Stream("oom_kills", "oom_kills_events", "oom_kills_event", 0, columns),),
    hooks=(
        # raw_tp first: it reads the victim's task (its cgroup too) on 6.8+; the classic
        # tracepoint (tracefs) knows the victim's cgroup only when it is the trigger
        Hook("oom/mark_victim", ("raw_tp__mark_victim", "tracepoint__oom__mark_victim")),
    ),
    stats_map="oom_kills_stats",
    rodata=rodata,
)
