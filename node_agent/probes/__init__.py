"""Probe descriptions: what the generic loader needs to run one bpf/<probe>.bpf.o.

Adding a probe is adding a module here that defines `PROBE` (and its name to PROBES in
bpf/Makefile); the loader finds it by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node_agent.columns import ColumnBuilder

__all__ = [
    "BccVariant",
    "Histogram",
    "Hook",
    "KernelField",
    "Probe",
    "ProbeSettings",
    "Stream",
    "all_probes",
    "get_probe",
]


class ProbeSettings(Protocol):
    """The agent settings the loader and the probes read (fleetscope.config.AgentOptions)."""

    @property
    def bpf_dir(self) -> Path:
        """Directory of the compiled *.bpf.o objects."""
        ...

    @property
    def ring_bytes(self) -> int:
        """Data size of each stream's ring buffer (power of two, >= page size)."""
        ...

    @property
    def filter_pid(self) -> int:
        """Only events of this process (thread group); 0: all."""
        ...

    @property
    def filter_cgroup(self) -> str:
        """Only events of tasks in this cgroup v2 directory or below; "": all."""
        ...

    @property
    def loader(self) -> str:
        """How probes are loaded: "auto", "libbpf" or "bcc" (node_agent.bcc_loader)."""
        ...

    @property
    def args_max(self) -> int:
        """Bytes of argv copied per exec (process probe)."""
        ...

    @property
    def histogram_max_keys(self) -> int:
        """Keys per interval of each in-kernel histogram map (the *_latency probes)."""
        ...

    @property
    def file_open_prefixes(self) -> tuple[str, ...]:
        """Successful opens under these path prefixes are recorded (file_open probe)."""
        ...

    @property
    def file_open_all(self) -> bool:
        """Record every open, not only failures and prefixes (file_open probe)."""
        ...

    @property
    def tcp_max_connections(self) -> int:
        """Connection ends tracked at once; more are counted as drops (tcp_connections probe)."""
        ...


@dataclass(frozen=True, slots=True)
class Stream:
    """One event kind of a probe: its ring buffer map and its record struct."""

    name: str  # e.g. "process_exec": topic, table and batch stream name
    ring_map: str  # BPF_MAP_TYPE_RINGBUF map, e.g. "process_exec_events"
    struct: str  # record type in the object's BTF, e.g. "process_exec_event"
    stats_index: int  # slot of this stream in the probe's per-CPU stats array
    columns: ColumnBuilder  # records -> the columns of the stream's <Stream>Batch message
    # byte-string columns of command-line text whose secrets the agent masks (node_agent.redact)
    redact: tuple[str, ...] = ()
    # char[N] fields batched only up to the widest value (Batcher.add_from): (field, "")
    # for a NUL-padded string, (field, length field) for bytes that only field[:length] uses
    narrow: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Histogram:
    """A stream of in-kernel log2 histograms (bpf/histogram.bpf.h) instead of a ring buffer:
    two generations of a per-CPU hash map of struct hist, read every histogram_interval
    (node_agent.histogram). A row is one key's histogram for one interval."""

    name: str  # e.g. "syscall_latency": topic, table and batch stream name
    maps: tuple[str, str]  # the BPF_MAP_TYPE_PERCPU_HASH of generation 0 and of generation 1
    key: str  # key struct in the object's BTF, e.g. "syscall_latency_key"
    stats_index: int  # slot of this stream in the probe's per-CPU stats array
    # rows (the key's fields, time_ns, interval_ns, count, sum_ns, buckets) -> columns
    columns: ColumnBuilder


@dataclass(frozen=True, slots=True)
class Hook:
    """One kernel hook and the programs that can serve it, the preferred one first.

    The loader attaches the first that attaches and leaves the others unattached: e.g. a
    classic tracepoint needs tracefs mounted, while its raw_tp twin attaches by name.
    """

    name: str  # "sched/sched_process_exec", for messages
    programs: tuple[str, ...]
    # a hook that may be missing without disabling the probe: e.g. a classic tracepoint that
    # only serves when its required twin attached classically, or a syscall this kernel or
    # architecture lacks (openat2 before 5.6, open/creat on arm64)
    optional: bool = False


@dataclass(frozen=True, slots=True)
class KernelField:
    """A kernel struct field that a bcc program reads at an offset, FS_OFF_<struct>__<field>:
    taken from the kernel's BTF by the bcc loader (the relocation CO-RE does), or from the
    kernel's headers by the program itself when the kernel has no BTF."""

    struct: str  # "task_struct"
    field: str  # "real_parent"; found inside anonymous struct/union members too
    size: int  # bytes the program reads; a kernel whose field differs is refused; 0: any (FS_SIZE_...)
    optional: bool = False  # absent on some kernels: the program tests #ifdef FS_OFF_...


@dataclass(frozen=True, slots=True)
class BccVariant:
    """How the bcc fallback loader runs a probe: its bcc source and the kernel fields it reads.

    The source defines one function per hook program, named like the program (classic
    tracepoints as tp__<category>__<event>), and uses the maps the loader creates.
    """

    source: str  # file in the object directory, e.g. "process.bcc.c"
    kernel_fields: tuple[KernelField, ...] = ()
    # knobs that are byte tables (bcc has no .rodata) -> macro definitions, e.g. a prefix test
    # unrolled into comparisons: {"FS_UNDER_PREFIX(h)": "(...)"}; int knobs are -D<name>=<value>
    macros: Callable[[Mapping[str, int | bytes]], Mapping[str, str]] | None = None
    # (program, raw tracepoint) where the program's name does not say it (raw_tp__<event>):
    # twins of one hook for different kernels, e.g. ("raw_tp__sched_process_exit_old", "sched_process_exit")
    targets: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Probe:
    """Everything the generic loader needs to load, attach and read one probe object."""

    name: str
    object_file: str  # file name in the object directory
    streams: tuple[Stream, ...]
    hooks: tuple[Hook, ...]
    stats_map: str  # BPF_MAP_TYPE_PERCPU_ARRAY of struct stream_stats
    rodata: Callable[[ProbeSettings], Mapping[str, int | bytes]]  # const volatile knobs
    # the bcc fallback (node_agent.bcc_loader): how, or why not (one line, e.g. "reads struct
    # sock through tp_btf arguments, which bcc cannot attach")
    bcc: BccVariant | None = None
    bcc_unavailable: str = ""
    histograms: tuple[Histogram, ...] = ()  # streams read from in-kernel histogram maps
    # max_entries of other maps, set from the settings before load (e.g. a per-socket table)
    map_sizes: Callable[[ProbeSettings], Mapping[str, int]] | None = None
    # maps this probe's object lends to a later probe's (bpf_map__reuse_fd): (map, flag), the
    # flag a 1-entry u32 array of this object the loader sets to 1 once a borrower is attached
    lends: tuple[tuple[str, str], ...] = ()
    # maps this probe's object takes from an earlier probe when it runs: (map, knob), the knob
    # a const volatile set to 1 when it did (bpf/exit_join.bpf.h); loaded after the lenders
    borrows: tuple[tuple[str, str], ...] = ()


def all_probes() -> dict[str, Probe]:
    """Every probe defined by a module of this package, by name."""
    probes = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        probe = getattr(module, "PROBE", None)
        if isinstance(probe, Probe):
            probes[probe.name] = probe
    return probes


def get_probe(name: str) -> Probe:
    """The probe called name; KeyError lists the known ones."""
    probes = all_probes()
    if name not in probes:
        raise KeyError(f"unknown probe {name!r}; known: {', '.join(sorted(probes))}")
    return probes[name]
