"""The "process" probe: process exec and exit from the sched tracepoints (bpf/process.bpf.c)."""

from __future__ import annotations

from collections.abc import Mapping

from node_agent.errors import ProbeConfigError
from node_agent.probes import Hook, Probe, ProbeSettings, Stream

__all__ = ["ARGS_MAX", "PROBE"]

ARGS_MAX = 1024  # PROCESS_ARGS_MAX in bpf/process.h: size of process_exec_event.args


def rodata(settings: ProbeSettings) -> Mapping[str, int]:
    """The probe's const volatile knobs from the agent settings."""
    if not 0 < settings.args_max <= ARGS_MAX:
        raise ProbeConfigError(f"args_max: {settings.args_max} is out of range; set it within 1..{ARGS_MAX}")
    return {"args_max": settings.args_max}


PROBE = Probe(
    name="process",
    object_file="process.bpf.o",
    streams=(
        Stream("process_exec", "process_exec_events", "process_exec_event", stats_index=0),
        Stream("process_exit", "process_exit_events", "process_exit_event", stats_index=1),
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
)
