"""The "file_open" probe: open, openat, openat2 and creat with path, flags and result
(bpf/file_open.bpf.c). Failures are always recorded; successes under the configured path
prefixes, or all of them with file_open_all."""

from __future__ import annotations

import platform
from collections.abc import Mapping

import numpy as np

from node_agent.columns import Records, padded_strings
from node_agent.errors import ProbeConfigError
from node_agent.libbpf import BpfObject, num_possible_cpus
from node_agent.probes import BccVariant, Hook, KernelField, Probe, ProbeSettings, Stream

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


def bcc_macros(knobs: Mapping[str, int | bytes]) -> dict[str, str]:
    """The prefix table as FS_UNDER_PREFIX(h) for bpf/file_open.bcc.c (bcc has no .rodata):
    under_prefix()'s byte comparisons of file_open.bpf.c, unrolled for the configured prefixes."""
    count = int(knobs["prefix_count"])
    lens = np.frombuffer(bytes(knobs["prefix_lens"]), "<u4")
    table = bytes(knobs["prefixes"])
    tests = []
    for i in range(count):
        prefix = table[i * PREFIX_BYTES : i * PREFIX_BYTES + int(lens[i])]
        # volatile loads: clang may not evaluate the comparisons ahead of the && branches,
        # which turns them into 0/1 values the verifier forks on, 2^n paths
        tests.append("(" + " && ".join(f"((volatile __u8 *)(h))[{j}] == {b}" for j, b in enumerate(prefix)) + ")")
    return {"FS_UNDER_PREFIX(h)": "(" + (" || ".join(tests) or "0") + ")"}


def _bcc_fields() -> tuple[KernelField, ...]:
    """The kernel fields raw_tp__sys_exit reads in bpf/file_open.bcc.c on this architecture:
    the syscall number and argument registers in struct pt_regs, the compat flag on x86."""
    if platform.machine() == "aarch64":
        return (
            KernelField("pt_regs", "syscallno", 4),
            KernelField("pt_regs", "orig_x0", 8),
            KernelField("pt_regs", "regs", 0),
            KernelField("task_struct", "thread_info", 0),
            KernelField("thread_info", "status", 0, optional=True),
        )
    return (
        KernelField("pt_regs", "orig_ax", 8),
        KernelField("pt_regs", "di", 8),
        KernelField("pt_regs", "si", 8),
        KernelField("pt_regs", "dx", 8),
        KernelField("pt_regs", "r10", 8),
        KernelField("task_struct", "thread_info", 0),  # embedded struct (CONFIG_THREAD_INFO_IN_TASK)
        KernelField("thread_info", "status", 4),
    )


def columns(rec: Records, offset_ns: int) -> dict[str, np.ndarray]:
    """file_open_event records -> FileOpenBatch columns."""
    ret = rec["ret"].astype("<i4", copy=False)
    failed = ret < 0
    return {
        "time": rec["time_ns"] + np.uint64(offset_ns),
        "pid": rec["pid"],
        "tid": rec["tid"],
        "uid": rec["uid"],
        "cgroup_id": rec["cgroup_id"],
        "comm": padded_strings(rec["comm"]),  # both NUL-padded by the BPF program
        "syscall": SYSCALLS[np.minimum(rec["syscall"], len(SYSCALLS) - 1)],
        "path": padded_strings(rec["path"]),
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
    streams=(Stream("file_open", "file_open_events", "file_open_event", 0, columns, narrow=(("path", ""),)),),
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
    bcc=BccVariant("file_open.bcc.c", _bcc_fields(), macros=bcc_macros),
)
