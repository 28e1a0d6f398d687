"""The "oom_kills" probe: OOM killer victims with their memory figures (bpf/oom_kills.bpf.c)."""

from __future__ import annotations

import mmap
from collections.abc import Mapping

import numpy as np

from node_agent.columns import Records, c_strings
from node_agent.probes import BccVariant, Hook, KernelField, Probe, ProbeSettings, Stream

__all__ = ["PROBE"]


def rodata(settings: ProbeSettings) -> Mapping[str, int | bytes]:
    """The probe's const volatile knobs: the page size, to turn mm counters into KiB."""
    return {"page_shift": mmap.PAGESIZE.bit_length() - 1}


IN_PROCESS_EXIT = 2  # OOM_KILLS_IN_PROCESS_EXIT in bpf/oom_kills.h


def columns(rec: Records, offset_ns: int) -> dict[str, np.ndarray]:
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
        "in_process_exit": ((rec["flags"] & IN_PROCESS_EXIT) >> 1).astype("<u4"),
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
    lends=(("oom_victims", "oom_kills_joined"),),  # to the process probe's exit (bpf/exit_join.bpf.h)
    bcc=BccVariant(
        "oom_kills.bcc.c",
        (
            KernelField("task_struct", "tgid", 4),
            KernelField("task_struct", "comm", 16),
            KernelField("task_struct", "mm", 8),
            KernelField("task_struct", "signal", 8),
            KernelField("task_struct", "cgroups", 8),
            KernelField("css_set", "dfl_cgrp", 8),
            KernelField("cgroup", "kn", 8),
            KernelField("kernfs_node", "id", 8),
            KernelField("signal_struct", "oom_score_adj", 2),
            KernelField("mm_struct", "total_vm", 8),
            KernelField("mm_struct", "pgtables_bytes", 8),
            KernelField("mm_struct", "rss_stat", 0),  # an array of 4 counters, their type by kernel:
            KernelField("mm_rss_stat", "count", 32, optional=True),  # before 6.2: atomic_long_t count[4]
            KernelField("percpu_counter", "count", 8),  # 6.2+: struct percpu_counter rss_stat[4]
        ),
    ),
)
