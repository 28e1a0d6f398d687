"""The "fatal_signals" probe: processes killed by SIGKILL, SIGSEGV, SIGBUS or SIGABRT, with
the signal's sender when seen (bpf/fatal_signals.bpf.c)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from node_agent.columns import Records, c_strings
from node_agent.probes import BccVariant, Hook, KernelField, Probe, ProbeSettings, Stream

__all__ = ["PROBE"]

CORE_DUMPED = 1  # FATAL_SIGNALS_CORE_DUMPED in bpf/fatal_signals.h
SENDER_KNOWN = 2  # FATAL_SIGNALS_SENDER_KNOWN
IN_PROCESS_EXIT = 4  # FATAL_SIGNALS_IN_PROCESS_EXIT


def rodata(settings: ProbeSettings) -> Mapping[str, int | bytes]:
    """No knobs of its own (the pid/cgroup filters are set by the loader)."""
    return {}


def columns(rec: Records, offset_ns: int) -> dict[str, np.ndarray]:
    """fatal_signals_event records -> FatalSignalsBatch columns."""
    flags = rec["flags"]
    return {
        "time": rec["time_ns"] + np.uint64(offset_ns),
        "pid": rec["pid"],
        "ppid": rec["ppid"],
        "uid": rec["uid"],
        "cgroup_id": rec["cgroup_id"],
        "comm": c_strings(rec["comm"]),
        "signal": rec["signal"],
        "core_dumped": (flags & CORE_DUMPED).astype("<u4"),
        "sender_known": ((flags & SENDER_KNOWN) >> 1).astype("<u4"),
        "code": rec["code"].astype("<i4", copy=False),
        "sender_pid": rec["sender_pid"],
        "sender_uid": rec["sender_uid"],
        "sender_comm": c_strings(rec["sender_comm"]),
        "sender_cgroup_id": rec["sender_cgroup_id"],
        "delay_ns": rec["delay_ns"],
        "in_process_exit": ((flags & IN_PROCESS_EXIT) >> 2).astype("<u4"),
    }


PROBE = Probe(
    name="fatal_signals",
    object_file="fatal_signals.bpf.o",
    streams=(Stream("fatal_signals", "fatal_signals_events", "fatal_signals_event", 0, columns),),
    hooks=(
        # the sender: classic tracepoint (tracefs) or raw_tp, which also resolves a
        # thread-directed signal's target to its process
        Hook("signal/signal_generate", ("tracepoint__signal__signal_generate", "raw_tp__signal_generate")),
        # the death: raw_tp with group_dead (6.16+), or without it on older kernels
        Hook(
            "sched/sched_process_exit",
            (
                "tracepoint__sched__sched_process_exit",
                "raw_tp__sched_process_exit",
                "raw_tp__sched_process_exit_old",
            ),
        ),
    ),
    stats_map="fatal_signals_stats",
    rodata=rodata,
    lends=(("fatal_signals_senders", "fatal_signals_joined"),),  # to the process probe's exit
    bcc=BccVariant(
        "fatal_signals.bcc.c",
        (
            KernelField("task_struct", "tgid", 4),
            KernelField("task_struct", "real_parent", 8),
            KernelField("task_struct", "group_leader", 8),
            KernelField("task_struct", "comm", 16),
            KernelField("task_struct", "start_boottime", 8),
            KernelField("task_struct", "exit_code", 4),
            KernelField("task_struct", "signal", 8),
            KernelField("signal_struct", "live", 4),
            KernelField("kernel_siginfo", "si_code", 4),
        ),
        targets=(("raw_tp__sched_process_exit_old", "sched_process_exit"),),
    ),
)
