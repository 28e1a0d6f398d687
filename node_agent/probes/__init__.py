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

__all__ = ["Hook", "Probe", "ProbeSettings", "Stream", "all_probes", "get_probe"]


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
    def args_max(self) -> int:
        """Bytes of argv copied per exec (process probe)."""
        ...


@dataclass(frozen=True, slots=True)
class Stream:
    """One event kind of a probe: its ring buffer map and its record struct."""

    name: str  # e.g. "process_exec": topic, table and batch stream name
    ring_map: str  # BPF_MAP_TYPE_RINGBUF map, e.g. "process_exec_events"
    struct: str  # record type in the object's BTF, e.g. "process_exec_event"
    stats_index: int  # slot of this stream in the probe's per-CPU stats array
    columns: ColumnBuilder  # records -> the columns of the stream's <Stream>Batch message


@dataclass(frozen=True, slots=True)
class Hook:
    """One kernel hook and the programs that can serve it, the preferred one first.

    The loader attaches the first that attaches and leaves the others unattached: e.g. a
    classic tracepoint needs tracefs mounted, while its raw_tp twin attaches by name.
    """

    name: str  # "sched/sched_process_exec", for messages
    programs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Probe:
    """Everything the generic loader needs to load, attach and read one probe object."""

    name: str
    object_file: str  # file name in the object directory
    streams: tuple[Stream, ...]
    hooks: tuple[Hook, ...]
    stats_map: str  # BPF_MAP_TYPE_PERCPU_ARRAY of struct stream_stats
    rodata: Callable[[ProbeSettings], Mapping[str, int]]  # const volatile knobs


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
