"""Generic probe loader: object -> configured, loaded, attached probe with its ring readers.

Works from a Probe description only (node_agent.probes.<name>.PROBE), so a new probe
plugs in without touching this module. Any failure raises a ProbeError subclass and
leaves nothing behind in the kernel; the agent then disables that probe alone.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from node_agent.btf import BtfError
from node_agent.errors import ProbeAttachError, ProbeConfigError, ProbeError, ProbeLoadError
from node_agent.histogram import HIST_STRUCT, HistogramReader
from node_agent.libbpf import BpfObject, Link, num_possible_cpus
from node_agent.probes import Probe, ProbeSettings, get_probe
from node_agent.ringbuf import RingBuffer

__all__ = ["LoadedProbe", "lent_maps", "load_probe", "mark_joined"]

log = logging.getLogger(__name__)

STATS_STRUCT = "stream_stats"  # value of every probe's per-CPU stats map (common.bpf.h)
WAKEUP_KNOB = "wakeup_bytes"  # common.bpf.h: force a reader wakeup past this many bytes
CGROUP_FILTER_MAP = "cgroup_filter"  # common.bpf.h: the filter_cgroup directory, slot 0


class LoadedProbe:
    """A probe running in the kernel: one RingBuffer per stream, counters, detach/close."""

    def __init__(
        self,
        probe: Probe,
        obj: BpfObject,
        links: Mapping[str, Link],
        rings: Mapping[str, RingBuffer],
        histograms: HistogramReader | None = None,
        borrowed: tuple[str, ...] = (),
    ) -> None:
        """Use load_probe()."""
        self.probe = probe
        self.borrowed = borrowed  # maps this object reuses from an earlier probe (Probe.borrows)
        self.obj = obj
        self.links = dict(links)  # hook name -> attached link
        self.rings = dict(rings)  # stream name -> ring reader
        self.histograms = histograms  # the in-kernel histogram streams, if any
        self._stats_dtype = obj.btf.struct_dtype(STATS_STRUCT)
        self._ncpus = num_possible_cpus()
        self._closed = False

    @property
    def name(self) -> str:
        """The probe's name."""
        return self.probe.name

    @property
    def attached(self) -> dict[str, str]:
        """Which program serves each hook (hook name -> program name)."""
        return {hook: link.program for hook, link in self.links.items() if link.attached}

    def stats(self) -> dict[str, dict[str, int]]:
        """Kernel counters per stream, summed over CPUs: {stream: {emitted, dropped}}."""
        size = self._stats_dtype.itemsize
        slot = (size + 7) & ~7  # per-CPU values come back 8-byte aligned, one per CPU
        out = {}
        streams = [(s.name, s.stats_index) for s in self.probe.streams]
        streams += [(h.name, h.stats_index) for h in self.probe.histograms]
        for name, index in streams:
            key = index.to_bytes(4, "little")
            raw = self.obj.lookup(self.probe.stats_map, key, slot * self._ncpus)
            cells = np.frombuffer(raw, np.uint8).reshape(self._ncpus, slot)[:, :size]
            per_cpu = np.ascontiguousarray(cells).view(self._stats_dtype).ravel()
            out[name] = {f: int(per_cpu[f].sum()) for f in ("emitted", "dropped")}
        return out

    def detach(self) -> None:
        """Detach every program: no new events; the rings can still be drained."""
        for link in self.links.values():
            link.destroy()

    def close(self) -> None:
        """Detach, unmap the rings and free the object's maps and programs (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.detach()
        for ring in self.rings.values():
            ring.close()
        self.obj.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def load_probe(
    probe: str | Probe,
    settings: ProbeSettings,
    *,
    object_dir: Path | None = None,
    rodata: Mapping[str, int] | None = None,
    reuse: Mapping[str, int] | None = None,
) -> LoadedProbe:
    """Open, configure (knobs, ring sizes), load and attach a probe; build its readers.

    object_dir overrides settings.bpf_dir; rodata overrides or adds const volatile knobs
    (e.g. targ_tgid, wakeup_bytes, which defaults to half the ring). reuse: map name
    -> fd of maps earlier probes lend (lent_maps()); those of Probe.borrows are taken.
    """
    if isinstance(probe, str):
        try:
            probe = get_probe(probe)
        except KeyError as e:
            raise ProbeConfigError(str(e.args[0])) from None
    ring_bytes = settings.ring_bytes
    if ring_bytes < mmap.PAGESIZE or ring_bytes & (ring_bytes - 1):
        raise ProbeConfigError(f"ring_bytes: {ring_bytes} must be a power of 2 and >= {mmap.PAGESIZE}")
    knobs = dict(probe.rodata(settings))
    map_sizes = dict(probe.map_sizes(settings)) if probe.map_sizes else {}
    if settings.filter_pid:
        knobs["targ_tgid"] = settings.filter_pid
    if settings.filter_cgroup:
        knobs["filter_cgroup"] = 1
    path = Path(object_dir or settings.bpf_dir) / probe.object_file
    obj = BpfObject.open(path, name=probe.name)
    rings: dict[str, RingBuffer] = {}
    cgroup_fd: int | None = None
    try:
        if settings.filter_cgroup:
            cgroup_fd = _open_cgroup(settings.filter_cgroup)
        dtypes = _configure(probe, obj, knobs, ring_bytes, rodata or {})
        for map_name, entries in map_sizes.items():
            obj.set_max_entries(map_name, entries)
        borrowed = _borrow(probe, obj, reuse or {})
        obj.load()
        if cgroup_fd is not None:
            # the kernel takes its own reference to the cgroup; our fd can go
            obj.update(CGROUP_FILTER_MAP, struct.pack("<I", 0), struct.pack("<I", cgroup_fd))
        links = _attach(probe, obj)
        for stream in probe.streams:
            fd = obj.map_fd(stream.ring_map)
            rings[stream.name] = RingBuffer(fd, ring_bytes, dtypes[stream.name])
        histograms = HistogramReader(obj, probe.histograms) if probe.histograms else None
        return LoadedProbe(probe, obj, links, rings, histograms, borrowed)
    except BaseException:
        for ring in rings.values():
            ring.close()
        obj.close()
        raise
    finally:
        if cgroup_fd is not None:
            os.close(cgroup_fd)


def _borrow(probe: Probe, obj: BpfObject, reuse: Mapping[str, int]) -> tuple[str, ...]:
    """Before load: reuse the lent maps the probe borrows and set their knobs; shrink the
    others, which nothing fills, to one entry. Returns the maps reused."""
    taken = []
    for map_name, knob in probe.borrows:
        try:
            if map_name in reuse:
                obj.reuse_map(map_name, reuse[map_name])
                obj.set_rodata(**{knob: 1})
                taken.append(map_name)
            else:
                obj.set_max_entries(map_name, 1)
        except (KeyError, ValueError) as e:
            raise ProbeConfigError(f"probe {probe.name}: {e.args[0]}") from None
    return tuple(taken)


def lent_maps(loaded: Iterable[object]) -> dict[str, int]:
    """Map name -> fd of every map the loaded (libbpf) probes lend (Probe.lends)."""
    return {name: p.obj.map_fd(name) for p in loaded if isinstance(p, LoadedProbe) for name, _ in p.probe.lends}


def mark_joined(borrower: LoadedProbe, loaded: Iterable[object]) -> None:
    """Once the borrower is attached: set the flag of each lender whose map it reused, so the
    lender's records say that the borrower's records carry them from now on."""
    for p in loaded:
        if isinstance(p, LoadedProbe) and p is not borrower:
            for name, flag in p.probe.lends:
                if name in borrower.borrowed:
                    try:
                        p.obj.update(flag, struct.pack("<I", 0), struct.pack("<I", 1))
                    except OSError as e:  # its rows then stay spans of their own (ingester/spans.py)
                        log.warning("probe %s: cannot mark %s shared with %s: %s", p.name, name, borrower.name, e)


def _open_cgroup(path: str) -> int:
    """A cgroup v2 directory, absolute or relative to the cgroup2 mount, opened for the filter."""
    full = Path(path) if path.startswith("/") else cgroup2_mount() / path
    try:
        return os.open(full, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ProbeConfigError(
            f"filter_cgroup: cannot open {full}: {e.strerror}; give a cgroup v2 directory, "
            f"absolute or relative to {cgroup2_mount()}"
        ) from None


def cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified in hybrid mode)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return Path("/sys/fs/cgroup")


def _configure(
    probe: Probe,
    obj: BpfObject,
    knobs: dict[str, int | bytes],
    ring_bytes: int,
    overrides: Mapping[str, int],
) -> dict[str, np.dtype]:
    """Apply knobs and ring sizes before load; return each stream's record dtype."""
    try:
        dtypes = {s.name: obj.btf.struct_dtype(s.struct) for s in probe.streams}
        obj.btf.struct_dtype(STATS_STRUCT)
        for h in probe.histograms:  # their row layout comes from BTF too
            obj.btf.struct_dtype(h.key)
            obj.btf.struct_dtype(HIST_STRUCT)
    except BtfError as e:
        raise ProbeLoadError(probe.name, errno.ENOEXEC, str(e), what="read btf of") from None
    try:
        variables = obj.btf.datasec_vars(".rodata")
    except BtfError:
        variables = {}  # a probe without knobs
    programs = obj.program_names()
    missing = [p for h in probe.hooks for p in h.programs if p not in programs]
    if missing:
        log = f"{obj.path}: no program {', '.join(missing)}"
        raise ProbeLoadError(probe.name, errno.ENOENT, log, what="open")
    if WAKEUP_KNOB in variables:
        knobs.setdefault(WAKEUP_KNOB, ring_bytes // 2)  # see Agent._watch
    knobs.update(overrides)
    try:
        obj.set_rodata(**knobs)
    except (KeyError, ValueError) as e:
        raise ProbeConfigError(f"probe {probe.name}: {e.args[0]}") from None
    for stream in probe.streams:
        if ring_bytes < (8 + dtypes[stream.name].itemsize + 7) & ~7:
            raise ProbeConfigError(f"ring_bytes: {ring_bytes} cannot hold one {stream.struct} record")
        obj.set_max_entries(stream.ring_map, ring_bytes)
    return dtypes


def _attach(probe: Probe, obj: BpfObject) -> dict[str, Link]:
    """Attach, per hook, the first program that attaches (an optional hook may have none);
    undo all on failure."""
    links: dict[str, Link] = {}
    try:
        for hook in probe.hooks:
            failures: list[ProbeAttachError] = []
            for program in hook.programs:
                try:
                    links[hook.name] = obj.attach(program)
                    break
                except ProbeAttachError as e:
                    failures.append(e)
            else:
                if hook.optional:
                    continue  # e.g. a syscall this kernel lacks; the probe runs without it
                raise ProbeAttachError(
                    probe.name,
                    " or ".join(hook.programs),
                    failures[-1].errno,
                    "\n".join(str(e) for e in failures),
                )
    except ProbeError:
        for link in links.values():
            link.destroy()
        raise
    return links
