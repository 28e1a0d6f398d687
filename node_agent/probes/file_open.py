"""The "file_open" probe: open, openat, openat2 and creat with path, flags and result
(bpf/file_open.bpf.c). Failures are always recorded; successes under the configured path
prefixes, or all of them with file_open_all."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from node_agent.columns import c_strings
from node_agent.errors import ProbeConfigError
from node_agent.libbpf import BpfObject, num_possible_cpus
from node_agent.probes import Hook, Probe, ProbeSettings, Stream

__all__ = ["PREFIXES_MAX", "PREFIX_BYTES", "PROBE", "SYSCALLS", "inflight_full"]

PREFIXES_MAX = 8  # FILE_OPEN_PREFIXES in bpf/file_open.h
PREFIX_BYTES = 64  # FILE_OPEN_PREFIX_LEN in bpf/file_open.h
PATH_TRUNCATED = 1  # FILE_OPEN_PATH_TRUNCATED in bpf/file_open.h
# enum file_open_syscall -> name; one extra entry for a value this agent does not know
SYSCALLS = np.array([b"openat", b"openat2", b"open", b"creat", b"?"], dtype="S8")


def rodata(settings: ProbeSettings) -> Mapping[str, int | bytes]:
    """The probe's const volatile knobs: capture_all and the prefix table."""
    prefixes = [p.encode() for p in settings.file_open_prefixes]
    if len(prefixes) > PREFIXES_MAX:
        raise ProbeConfigError(f"file_open_prefixes: {len(prefixes)} given; at most {PREFIXES_MAX}")
    for p in prefixes:
        if not 0 < len(p) <= PREFIX_BYTES:
            raise ProbeConfigError(f"file_open_prefixes: {p!r} must be 1..{PREFIX_BYTES} bytes")
    lens = np.zeros(PREFIXES_MAX, "<u4")
    lens[: len(prefixes)] = [len(p) for p in prefixes]
    table = b"".join(p.ljust(PREFIX_BYTES, b"\0") for p in prefixes)
    return {
        "capture_all": int(settings.file_open_all),
        "prefix_count": len(prefixes),
        "prefix_lens": lens.tobytes(),
        "prefixes": table.ljust(PREFIXES_MAX * PREFIX_BYTES, b"\0"),
    }


def columns(rec: np.ndarray, offset_ns: int) -> dict[str, np.ndarray]:
    """file_open_event records -> FileOpenBatch columns."""
    ret = rec["ret"].astype("<i4", copy=False)
    failed = ret < 0
    return {
        "time": rec["time_ns"] + np.uint64(offset_ns),
        "pid": rec["pid"],
        "tid": rec["tid"],
        "uid": rec["uid"],
        "cgroup_id": rec["cgroup_id"],
        "comm": c_strings(rec["comm"]),
        "syscall": SYSCALLS[np.minimum(rec["syscall"], len(SYSCALLS) - 1)],
        "path": c_strings(rec["path"]),
        "flags": rec["flags"],
        "mode": rec["mode"],
        "fd": np.where(failed, np.int32(-1), ret).astype("<i4"),
        "errno": np.where(failed, -ret, 0).astype("<u4"),
        "dfd": rec["dfd"].astype("<i4", copy=False),
        "path_truncated": (rec["rflags"] & PATH_TRUNCATED).astype("<u4"),
    }


def inflight_full(obj: BpfObject) -> int:
    """Opens not followed because the per-thread map was full (classic mode), all CPUs.
    Each is also in the stream's kernel drop count."""
    ncpus = num_possible_cpus()
    raw = obj.lookup("file_open_inflight_full", b"\0\0\0\0", 8 * ncpus)
    return int(np.frombuffer(raw, "<u8").sum())


def _classic(syscall: str) -> tuple[Hook, Hook]:
    """The enter and exit tracepoints of one syscall, optional: they serve only when the
    exit of openat attached classically (raw_tp__sys_exit covers every syscall alone), and
    a kernel or architecture may lack the syscall (openat2 before 5.6, open/creat on arm64)."""
    return (
        Hook(f"syscalls/sys_enter_{syscall}", (f"tracepoint__syscalls__sys_enter_{syscall}",), optional=True),
        Hook(f"syscalls/sys_exit_{syscall}", (f"tracepoint__syscalls__sys_exit_{syscall}",), optional=True),
    )


PROBE = Probe(
    name="file_open",
    object_file="file_open.bpf.o",
    streams=(Stream("file_open", "file_open_events", "file_open_event", 0, columns),),
    hooks=(
        # classic syscall tracepoints (tracefs) fire for these syscalls only; without
        # tracefs, raw_tp/sys_exit sees every syscall's exit and filters on the number
        Hook("syscalls/sys_exit_openat", ("tracepoint__syscalls__sys_exit_openat", "raw_tp__sys_exit")),
        Hook("syscalls/sys_enter_openat", ("tracepoint__syscalls__sys_enter_openat",), optional=True),
        *_classic("openat2"),
        *_classic("open"),
        *_classic("creat"),
    ),
    stats_map="file_open_stats",
    rodata=rodata,
)
