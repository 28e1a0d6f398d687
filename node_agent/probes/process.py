"""The "process" probe: process exec and exit from the sched tracepoints (bpf/process.bpf.c)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from node_agent.columns import Records, argv_strings, c_strings, padded_strings
from node_agent.errors import ProbeConfigError
from node_agent.probes import BccVariant, Hook, KernelField, Probe, ProbeSettings, Stream

__all__ = ["ARGS_MAX", "PROBE"]

ARGS_MAX = 1024  # PROCESS_ARGS_MAX in bpf/process.h: size of process_exec_event.args
ARGS_TRUNCATED = 1  # PROCESS_EXEC_ARGS_TRUNCATED in bpf/process.h
OOM_KILLED, SENDER_KNOWN, SIGNALS_JOINED = 1, 2, 4  # PROCESS_EXIT_* in bpf/process.h


def rodata(settings: ProbeSettings) -> Mapping[str, int]:
    """The probe's const volatile knobs from the agent settings."""
    if not 0 < settings.args_max <= ARGS_MAX:
        raise ProbeConfigError(f"args_max: {settings.args_max} is out of range; set it within 1..{ARGS_MAX}")
    return {"args_max": settings.args_max}


def exec_columns(rec: Records, offset_ns: int) -> dict[str, np.ndarray]:
    """process_exec_event records -> ProcessExecBatch columns."""
    return {
        "time": rec["time_ns"] + np.uint64(offset_ns),
        "pid": rec["pid"],
        "ppid": rec["ppid"],
        "uid": rec["uid"],
        "cgroup_id": rec["cgroup_id"],
        "comm": padded_strings(rec["comm"]),  # both NUL-padded by the BPF program
        "filename": padded_strings(rec["filename"]),
        "args": argv_strings(rec["args"], rec["args_len"]),
        "argc": rec["argc"],
        "args_truncated": (rec["flags"] & ARGS_TRUNCATED).astype("<u4"),
    }


def exit_columns(rec: Records, offset_ns: int) -> dict[str, np.ndarray]:
    """process_exit_event records -> ProcessExitBatch columns."""
    flags = rec["flags"]
    return {
        "time": rec["time_ns"] + np.uint64(offset_ns),
        "pid": rec["pid"],
        "ppid": rec["ppid"],
        "cgroup_id": rec["cgroup_id"],
        "comm": padded_strings(rec["comm"]),  # NUL-padded by bpf_get_current_comm
        "exit_code": rec["exit_code"].astype("<i4", copy=False),
        "signal": rec["signal"],
        "duration_ns": rec["duration_ns"],
        # what oom_kills and fatal_signals saw of the process (bpf/exit_join.bpf.h)
        "oom_killed": (flags & OOM_KILLED).astype("<u4"),
        "oom_delay_ns": rec["oom_delay_ns"],
        "oom_total_vm_kb": rec["oom_total_vm_kb"],
        "oom_anon_rss_kb": rec["oom_anon_rss_kb"],
        "oom_file_rss_kb": rec["oom_file_rss_kb"],
        "oom_shmem_rss_kb": rec["oom_shmem_rss_kb"],
        "oom_pgtables_kb": rec["oom_pgtables_kb"],
        "oom_score_adj": rec["oom_score_adj"].astype("<i4"),
        "oom_trigger_pid": rec["oom_trigger_pid"],
        "signal_sender_known": ((flags & SENDER_KNOWN) >> 1).astype("<u4"),
        "signal_code": rec["signal_code"].astype("<i4", copy=False),
        "signal_sender_pid": rec["signal_sender_pid"],
        "signal_sender_uid": rec["signal_sender_uid"],
        "signal_sender_comm": c_strings(rec["signal_sender_comm"]),
        "signal_delay_ns": rec["signal_delay_ns"],
        "fatal_signals_joined": ((flags & SIGNALS_JOINED) >> 2).astype("<u4"),
    }


PROBE = Probe(
    name="process",
    object_file="process.bpf.o",
    streams=(
        Stream(
            "process_exec",
            "process_exec_events",
            "process_exec_event",
            0,
            exec_columns,
            redact=("args",),
            narrow=(("filename", ""), ("args", "args_len")),
        ),
        Stream("process_exit", "process_exit_events", "process_exit_event", 1, exit_columns),
    ),
    hooks=(
        # classic tracepoints need tracefs mounted; raw_tp (4.17+) attaches without it
        Hook(
            "sched/sched_process_exec",
            ("tracepoint__sched__sched_process_exec", "raw_tp__sched_process_exec"),
        ),
        Hook(
            "sched/sched_process_exit",
            ("tracepoint__sched__sched_process_exit", "raw_tp__sched_process_exit"),
        ),
    ),
    stats_map="process_stats",
    rodata=rodata,
    # the exit record carries what oom_kills / fatal_signals saw, through their maps
    borrows=(("oom_victims", "oom_victims_shared"), ("fatal_signals_senders", "senders_shared")),
    bcc=BccVariant(
        "process.bcc.c",
        (
            KernelField("task_struct", "real_parent", 8),
            KernelField("task_struct", "tgid", 4),
            KernelField("task_struct", "mm", 8),
            KernelField("task_struct", "signal", 8),
            KernelField("task_struct", "exit_code", 4),
            KernelField("task_struct", "start_boottime", 8),
            KernelField("mm_struct", "arg_start", 8),
            KernelField("mm_struct", "arg_end", 8),
            KernelField("linux_binprm", "filename", 8),
            KernelField("signal_struct", "group_exec_task", 8, optional=True),  # 5.16+
        ),
    ),
)
