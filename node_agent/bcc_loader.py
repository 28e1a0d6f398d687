"""bcc fallback loader: the same probes, maps, records and readers, compiled by bcc at start.

For kernels without BTF, where CO-RE objects cannot relocate, and for `--loader=bcc`. The
loader creates the maps itself (the rings and per-CPU stats map that the CO-RE object
declares, sized the same way) and hands their fds to bcc as -DFS_FD_<map>; bcc only
compiles bpf/<probe>.bcc.c and loads and attaches its programs. So the ring buffers are
read by node_agent.ringbuf with record dtypes from the probe object's own BTF, exactly as
with libbpf, and everything downstream is unchanged. The compile asserts that bcc lays the
records out as that BTF says.

Kernel struct offsets (task->real_parent, ...) come from /sys/kernel/btf/vmlinux when the
kernel has BTF; then bcc needs no kernel headers beyond bpf/bcc-headers. Without BTF they
come from the kernel's own headers (bcc's search: /lib/modules/$(uname -r)/build, or
CONFIG_IKHEADERS, or BCC_KERNEL_SOURCE), which must match the running kernel.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import logging
import mmap
import os
import re
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self

import numpy as np

from node_agent.btf import Btf, BtfError
from node_agent.errors import ProbeAttachError, ProbeConfigError, ProbeError, ProbeLoadError, errno_text
from node_agent.libbpf import create_map, map_lookup, map_update, num_possible_cpus
from node_agent.loader import CGROUP_FILTER_MAP, STATS_STRUCT, WAKEUP_KNOB, LoadedProbe, _open_cgroup
from node_agent.loader import load_probe as load_probe_libbpf
from node_agent.probes import Probe, ProbeSettings, get_probe
from node_agent.ringbuf import RingBuffer

__all__ = [
    "BccProbe",
    "BccUnavailable",
    "import_bcc",
    "load_probe_bcc",
    "load_selected",
    "resolve_loader",
]

logger = logging.getLogger(__name__)

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
HEADERS_DIR = "bcc-headers"  # in the object directory: what bcc needs when offsets come from BTF
TRACEFS_DIRS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
# Debian/Ubuntu's python3-bpfcc; Fedora's python3-bcc
BCC_PACKAGE_DIRS = (
    Path("/usr/lib/python3/dist-packages"),
    Path(f"/usr/lib/python3.{sys.version_info.minor}/site-packages"),
)
KERNEL_SOURCE_ENV = "BCC_KERNEL_SOURCE"  # read by libbcc itself when it compiles
COMMON_KNOBS = (WAKEUP_KNOB, "targ_tgid", "filter_cgroup")  # common.bcc.h

# enum bpf_map_type (include/uapi/linux/bpf.h)
_MAP_PERCPU_ARRAY, _MAP_CGROUP_ARRAY, _MAP_RINGBUF = 6, 8, 27
_TRACEPOINT_PREFIX, _RAW_TP_PREFIX = "tracepoint__", "raw_tp__"


class BccUnavailable(ProbeLoadError):
    """The bcc fallback cannot run this probe here; the message says why and what would fix it."""

    def __init__(self, probe: str, err: int, reason: str, log: str = "") -> None:
        """reason: one line; log: bcc's and clang's output, the tail of which is appended."""
        self.probe, self.errno, self.log, self.reason = probe, err, log, reason
        lines = log.rstrip().splitlines()[-30:]
        ProbeError.__init__(self, "\n".join([f"bcc: probe {probe!r} unavailable: {reason}", *lines]))


def resolve_loader(loader: str) -> str:
    """The loader that "auto" means on this kernel: libbpf with kernel BTF, else bcc."""
    if loader == "auto":
        return "libbpf" if VMLINUX_BTF.exists() else "bcc"
    return loader


def load_selected(
    probe: str | Probe, settings: ProbeSettings, reuse: Mapping[str, int] | None = None
) -> LoadedProbe | BccProbe:
    """Load a probe with the loader settings.loader selects (the agent's entry point).
    reuse: maps earlier probes lend (node_agent.loader.lent_maps); bcc shares none."""
    if resolve_loader(settings.loader) == "bcc":
        return load_probe_bcc(probe, settings)
    return load_probe_libbpf(probe, settings, reuse=reuse)


def import_bcc() -> ModuleType:
    """bcc's Python package: importable as is, or Debian's python3-bpfcc from its system path.

    Debian installs bcc for /usr/bin/python3 only. It is pure Python over libbcc.so.0
    (ctypes), so any Python 3 can run it: import just that package from its directory,
    without putting the whole system site-packages (and its other versions of numpy,
    protobuf, ...) on sys.path.
    """
    if "bcc" in sys.modules:
        return sys.modules["bcc"]
    try:
        return importlib.import_module("bcc")
    except ImportError:
        pass
    for base in BCC_PACKAGE_DIRS:
        init = base / "bcc" / "__init__.py"
        if not init.is_file():
            continue
        spec = importlib.util.spec_from_file_location("bcc", init, submodule_search_locations=[str(init.parent)])
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["bcc"]
            raise
        return module
    raise ImportError(
        "bcc's Python package is not installed: apt install python3-bpfcc (Debian, Ubuntu) "
        "or dnf install python3-bcc (Fedora)"
    )


@dataclass(frozen=True, slots=True)
class _Attachment:
    """One attached program: how bcc detaches it."""

    program: str  # the hook's program name, as in the CO-RE object
    kind: str  # "tracepoint" or "raw_tracepoint"
    target: str  # "sched:sched_process_exec" / "sched_process_exec"


class BccProbe:
    """A probe running through bcc, with the surface of loader.LoadedProbe."""

    def __init__(
        self,
        probe: Probe,
        bpf: Any,
        map_fds: Mapping[str, int],
        rings: Mapping[str, RingBuffer],
        stats_dtype: np.dtype,
    ) -> None:
        """Use load_probe_bcc()."""
        self.probe = probe
        self.bpf = bpf  # bcc.BPF
        self.map_fds = dict(map_fds)  # owned here, closed by close()
        self.rings = dict(rings)  # stream name -> ring reader
        self.links: dict[str, _Attachment] = {}  # hook name -> attached program
        self._stats_dtype = stats_dtype
        self._ncpus = num_possible_cpus()
        self._closed = False

    @property
    def name(self) -> str:
        """The probe's name."""
        return self.probe.name

    @property
    def attached(self) -> dict[str, str]:
        """Which program serves each hook (hook name -> program name)."""
        return {hook: a.program for hook, a in self.links.items()}

    @property
    def retargeted(self) -> dict[str, str]:
        """Hooks whose program runs on another kind of attach point than its name says
        (BccVariant.targets, e.g. a tp_btf twin as a raw tracepoint): hook -> how."""
        names = dict(self.probe.bcc.targets) if self.probe.bcc else {}
        return {
            hook: f"as raw tracepoint {a.target}"
            for hook, a in self.links.items()
            if a.program in names and not a.program.startswith(_RAW_TP_PREFIX)
        }

    def stats(self) -> dict[str, dict[str, int]]:
        """Kernel counters per stream, summed over CPUs: {stream: {emitted, dropped}}."""
        size = self._stats_dtype.itemsize
        slot = (size + 7) & ~7  # per-CPU values come back 8-byte aligned, one per CPU
        fd = self.map_fds[self.probe.stats_map]
        out = {}
        for stream in self.probe.streams:
            raw = map_lookup(fd, stream.stats_index.to_bytes(4, "little"), slot * self._ncpus)
            cells = np.frombuffer(raw, np.uint8).reshape(self._ncpus, slot)[:, :size]
            per_cpu = np.ascontiguousarray(cells).view(self._stats_dtype).ravel()
            out[stream.name] = {f: int(per_cpu[f].sum()) for f in ("emitted", "dropped")}
        return out

    def detach(self) -> None:
        """Detach every program: no new events; the rings can still be drained."""
        for a in self.links.values():
            if a.kind == "tracepoint":
                self.bpf.detach_tracepoint(tp=a.target.encode())
            else:
                self.bpf.detach_raw_tracepoint(tp=a.target.encode())
        self.links.clear()

    def close(self) -> None:
        """Detach, unmap the rings, unload the programs and close the maps (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.detach()
        for ring in self.rings.values():
            ring.close()
        self.bpf.cleanup()
        for fd in self.map_fds.values():
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def load_probe_bcc(
    probe: str | Probe,
    settings: ProbeSettings,
    *,
    object_dir: Path | None = None,
    rodata: Mapping[str, int] | None = None,
    kernel_btf: Path | None = VMLINUX_BTF,
) -> BccProbe:
    """Compile, load and attach a probe's bcc variant; build its readers.

    object_dir overrides settings.bpf_dir (bcc sources, headers and the CO-RE object whose
    BTF gives the record layouts); rodata overrides or adds knobs, as with libbpf.
    kernel_btf is where kernel struct offsets come from; None: from the kernel's headers.
    Any failure raises a ProbeError subclass and leaves nothing behind in the kernel.
    """
    if isinstance(probe, str):
        try:
            probe = get_probe(probe)
        except KeyError as e:
            raise ProbeConfigError(str(e.args[0])) from None
    if probe.bcc is None:
        raise BccUnavailable(
            probe.name, errno.ENOTSUP, probe.bcc_unavailable or f"no bcc variant written (bpf/{probe.name}.bcc.c)"
        )
    ring_bytes = settings.ring_bytes
    if ring_bytes < mmap.PAGESIZE or ring_bytes & (ring_bytes - 1):
        raise ProbeConfigError(f"ring_bytes: {ring_bytes} must be a power of 2 and >= {mmap.PAGESIZE}")
    knobs = dict(probe.rodata(settings))
    knobs[WAKEUP_KNOB] = ring_bytes // 2  # as the libbpf loader: see Agent._watch
    if settings.filter_pid:
        knobs["targ_tgid"] = settings.filter_pid
    if settings.filter_cgroup:
        knobs["filter_cgroup"] = 1
    unknown = sorted(set(rodata or {}) - set(knobs) - set(COMMON_KNOBS))
    if unknown:
        raise ProbeConfigError(f"probe {probe.name}: no knob {unknown[0]!r} (knobs: {', '.join(sorted(knobs))})")
    knobs.update(rodata or {})
    macros = _knob_macros(probe, knobs)

    directory = Path(object_dir or settings.bpf_dir)
    source = directory / probe.bcc.source
    if not source.is_file():
        raise BccUnavailable(probe.name, errno.ENOENT, f"{source}: no such file")
    dtypes, stats_dtype = _record_dtypes(probe, directory)
    for stream in probe.streams:
        if ring_bytes < (8 + dtypes[stream.name].itemsize + 7) & ~7:
            raise ProbeConfigError(f"ring_bytes: {ring_bytes} cannot hold one {stream.struct} record")
    if kernel_btf is not None and kernel_btf.exists():
        cflags = _btf_offsets(probe, kernel_btf)
        headers: Path | None = directory / HEADERS_DIR
    else:
        cflags = ["-DFS_KERNEL_HEADERS"]  # the kernel's own headers: bcc finds them
        headers = None
    tracefs = _tracefs_formats(probe)
    if tracefs:
        cflags.append("-DFS_TRACEPOINTS")
        cflags += _tracefs_fields(probe, tracefs)
    try:
        bcc = import_bcc()
    except (ImportError, OSError) as e:  # OSError: libbcc.so.0 missing
        raise BccUnavailable(probe.name, errno.ENOENT, str(e)) from None

    map_fds: dict[str, int] = {}
    rings: dict[str, RingBuffer] = {}
    bpf: Any = None
    try:
        map_fds = _create_maps(probe, ring_bytes, stats_dtype)
        if settings.filter_cgroup:
            cgroup_fd = _open_cgroup(settings.filter_cgroup)
            try:
                map_update(map_fds[CGROUP_FILTER_MAP], struct.pack("<I", 0), struct.pack("<I", cgroup_fd))
            finally:
                os.close(cgroup_fd)
        cflags += [f"-I{directory}", f"-DFS_LINUX_VERSION_CODE={_kernel_version_code()}"]
        cflags += [f"-DFS_FD_{name}={fd}" for name, fd in map_fds.items()]
        cflags += [f"-D{name}={value}" for name, value in macros.items()]
        # max_entries the libbpf loader sets before load, for the maps the bcc source declares
        sizes = probe.map_sizes(settings) if probe.map_sizes else {}
        cflags += [f"-DFS_MAX_{name}={int(n)}" for name, n in sizes.items()]
        text = source.read_text() + _layout_asserts(probe, dtypes, stats_dtype, directory)
        bpf = _compile(bcc, probe, text, cflags, headers)
        loaded = BccProbe(probe, bpf, map_fds, {}, stats_dtype)
        for stream in probe.streams:
            rings[stream.name] = RingBuffer(map_fds[stream.ring_map], ring_bytes, dtypes[stream.name])
        loaded.rings = dict(rings)
        _attach(bcc, loaded, tracefs)
        return loaded
    except BaseException:
        for ring in rings.values():
            ring.close()
        if bpf is not None:
            bpf.cleanup()
        for fd in map_fds.values():
            os.close(fd)
        raise


def _record_dtypes(probe: Probe, directory: Path) -> tuple[dict[str, np.dtype], np.dtype]:
    """Record and stats dtypes from the CO-RE object's BTF, as the libbpf loader reads them.

    That BTF is clang's description of bpf/<probe>.h, independent of the running kernel:
    objects built where BTF exists (the image build) serve nodes without it.
    """
    path = directory / probe.object_file
    if not path.is_file():
        raise BccUnavailable(
            probe.name,
            errno.ENOENT,
            f"{path}: no such file; the record layouts are read from its BTF: build it with "
            "`make -C bpf` (on any machine with kernel BTF: the objects are kernel-independent)",
        )
    try:
        btf = Btf.from_file(path)
        return {s.name: btf.struct_dtype(s.struct) for s in probe.streams}, btf.struct_dtype(STATS_STRUCT)
    except BtfError as e:
        raise ProbeLoadError(probe.name, errno.ENOEXEC, str(e), what="read btf of") from None


def _btf_offsets(probe: Probe, kernel_btf: Path) -> list[str]:
    """-DFS_OFF_<struct>__<field>=<offset> for the fields the bcc source reads, from kernel BTF."""
    assert probe.bcc is not None
    try:
        vmlinux = Btf.from_file(kernel_btf)
    except (OSError, BtfError) as e:
        raise BccUnavailable(probe.name, errno.ENOEXEC, f"cannot read kernel btf {kernel_btf}: {e}") from None
    flags = []
    for f in probe.bcc.kernel_fields:
        try:
            member = vmlinux.member(f.struct, f.field)
        except BtfError as e:
            if f.optional:
                continue
            raise BccUnavailable(probe.name, errno.ESRCH, f"kernel btf: {e}") from None
        if (f.size and member.size != f.size) or member.kind == "bitfield":
            raise BccUnavailable(
                probe.name,
                errno.ESRCH,
                f"kernel btf: {f.struct}.{f.field} is {member.size} bytes ({member.kind}), the program reads {f.size}",
            )
        flags.append(f"-DFS_OFF_{f.struct}__{f.field}={member.offset}")
        flags.append(f"-DFS_SIZE_{f.struct}__{f.field}={member.size}")
    return flags


def _knob_macros(probe: Probe, knobs: Mapping[str, int | bytes]) -> dict[str, str]:
    """The knobs as macro definitions: integers as themselves, byte tables (arrays in .rodata
    with libbpf; bcc has no .rodata) through the probe's BccVariant.macros."""
    assert probe.bcc is not None
    out = {name: str(int(value)) for name, value in knobs.items() if not isinstance(value, bytes)}
    tables = sorted(name for name, value in knobs.items() if isinstance(value, bytes))
    if tables:
        if probe.bcc.macros is None:
            raise ProbeConfigError(f"probe {probe.name}: knob {tables[0]!r} is a table; its bcc variant takes none")
        out.update(probe.bcc.macros(knobs))
    return out


def _classic_points(probe: Probe) -> list[list[str]]:
    """[category, event] of every classic tracepoint program of the probe."""
    return [
        program.removeprefix(_TRACEPOINT_PREFIX).split("__", 1)
        for hook in probe.hooks
        for program in hook.programs
        if program.startswith(_TRACEPOINT_PREFIX)
    ]


def _tracefs_fields(probe: Probe, root: Path) -> list[str]:
    """-DFS_TP_<category>__<event>__<field> for each field of the probe's classic tracepoints:
    what bpf_core_field_exists() tests on a tracepoint record with libbpf (fields that
    kernels added later, e.g. sched_process_exit's group_dead in 6.16)."""
    flags = []
    for cat, event in _classic_points(probe):
        text = (root / "events" / cat / event / "format").read_text(errors="replace")
        for m in re.finditer(r"field:[^;]*?(\w+)(?:\[[^;]*\])?;", text):
            if not m.group(1).startswith("common_"):
                flags.append(f"-DFS_TP_{cat}__{event}__{m.group(1)}")
    return sorted(set(flags))


def _tracefs_formats(probe: Probe) -> Path | None:
    """The tracefs mount, if it has the format file of every classic tracepoint the probe
    uses: bcc generates their argument structs from these at compile time."""
    points = _classic_points(probe)
    for root in TRACEFS_DIRS:
        if points and all((root / "events" / cat / event / "format").is_file() for cat, event in points):
            return root
    return None


def _create_maps(probe: Probe, ring_bytes: int, stats_dtype: np.dtype) -> dict[str, int]:
    """The maps the CO-RE object declares: one ring per stream, the per-CPU stats array and
    the cgroup filter; name -> fd."""
    fds: dict[str, int] = {}
    try:
        for stream in probe.streams:
            fds[stream.ring_map] = create_map(_MAP_RINGBUF, stream.ring_map, 0, 0, ring_bytes)
        slots = max(s.stats_index for s in probe.streams) + 1
        fds[probe.stats_map] = create_map(_MAP_PERCPU_ARRAY, probe.stats_map, 4, stats_dtype.itemsize, slots)
        fds[CGROUP_FILTER_MAP] = create_map(_MAP_CGROUP_ARRAY, CGROUP_FILTER_MAP, 4, 4, 1)
    except OSError as e:
        for fd in fds.values():
            os.close(fd)
        raise ProbeLoadError(probe.name, e.errno or errno.EINVAL, str(e)) from None
    return fds


def _layout_asserts(probe: Probe, dtypes: Mapping[str, np.dtype], stats_dtype: np.dtype, directory: Path) -> str:
    """C11 static assertions that bcc's compile of the record structs has the offsets and
    sizes of the dtypes the rings are read with (from the CO-RE object's BTF)."""
    where = f"as in {directory / probe.object_file}'s btf: rebuild it with make -C bpf"
    checks = [(s.struct, dtypes[s.name]) for s in probe.streams] + [(STATS_STRUCT, stats_dtype)]
    lines = ["", "/* record layouts, added by node_agent.bcc_loader */"]
    for name, dtype in checks:
        lines.append(f'_Static_assert(sizeof(struct {name}) == {dtype.itemsize}, "struct {name} size {where}");')
        for field, spec in (dtype.fields or {}).items():
            offset = spec[1]
            lines.append(
                f"_Static_assert(__builtin_offsetof(struct {name}, {field}) == {offset}, "
                f'"{name}.{field} offset {where}");'
            )
    return "\n".join(lines) + "\n"


def _kernel_version_code() -> int:
    """LINUX_VERSION_CODE of the running kernel, from its release ("6.18.44-...")."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", os.uname().release)
    if not m:
        return 0
    major, minor, patch = (int(g or 0) for g in m.groups())
    return (major << 16) + (minor << 8) + min(patch, 255)


@contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Send this process's fds 1 and 2 to a file while inside (libbcc and clang write their
    diagnostics and the verifier log there, from C); the text is in the list afterwards."""
    out: list[str] = []
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            yield out
        finally:
            libc.fflush(None)  # C stdio (and std::cout) buffers
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


@contextmanager
def _kernel_source(headers: Path | None) -> Iterator[None]:
    """Point libbcc at the header directory while it compiles (None: leave its own search)."""
    if headers is None:
        yield
        return
    previous = os.environ.get(KERNEL_SOURCE_ENV)
    os.environ[KERNEL_SOURCE_ENV] = str(headers)
    try:
        yield
    finally:
        if previous is None:
            del os.environ[KERNEL_SOURCE_ENV]
        else:
            os.environ[KERNEL_SOURCE_ENV] = previous


def _compile(bcc: ModuleType, probe: Probe, text: str, cflags: list[str], headers: Path | None) -> Any:
    """bcc.BPF(text): clang compiles the program in memory; nothing is loaded yet."""
    failure: str | None = None
    with _kernel_source(headers), _captured_output() as out:
        try:
            bpf = bcc.BPF(text=text.encode(), cflags=cflags)
        except Exception as e:  # bcc raises plain Exception; the reason is in its output
            failure = str(e)
    log = out[0] if out else ""
    if failure is None:
        if log.strip():  # warnings; anything else written to stdout/stderr meanwhile
            logger.debug("bcc compiled probe %s; output: %s", probe.name, log.strip())
        return bpf
    if "Unable to find kernel headers" in log:
        reason = (
            f"no kernel headers for {os.uname().release} and no kernel btf: install the headers "
            "matching the running kernel (Debian: linux-headers-$(uname -r)), build the kernel "
            "with CONFIG_IKHEADERS, or set BCC_KERNEL_SOURCE to a header tree of this kernel"
        )
        raise BccUnavailable(probe.name, errno.ENOENT, reason, log)
    raise BccUnavailable(probe.name, errno.EINVAL, f"bcc could not compile the program: {failure}", log)


def _hook_target(program: str, targets: Mapping[str, str]) -> tuple[str, str, str] | str:
    """(bcc function, kind, attach target) of a hook program, or why bcc cannot run it;
    targets: raw tracepoints of programs whose names do not say them (BccVariant.targets)."""
    if program in targets:
        return program, "raw_tracepoint", targets[program]
    if program.startswith(_TRACEPOINT_PREFIX):
        cat, sep, event = program.removeprefix(_TRACEPOINT_PREFIX).partition("__")
        if sep:
            return f"tp__{cat}__{event}", "tracepoint", f"{cat}:{event}"
    if program.startswith(_RAW_TP_PREFIX):
        return program, "raw_tracepoint", program.removeprefix(_RAW_TP_PREFIX)
    return f"{program}: the bcc fallback attaches classic and raw tracepoints only"


def _attach(bcc: ModuleType, loaded: BccProbe, tracefs: Path | None) -> None:
    """Load and attach, per hook, the first program that loads and attaches (an optional hook
    may have none); a verifier rejection fails the probe, as with libbpf."""
    bpf, probe = loaded.bpf, loaded.probe
    lib = bcc.libbcc.lib
    functions = {lib.bpf_function_name(bpf.module, i).decode() for i in range(lib.bpf_num_functions(bpf.module))}
    prog_types = {"tracepoint": bcc.BPF.TRACEPOINT, "raw_tracepoint": bcc.BPF.RAW_TRACEPOINT}
    targets = dict(probe.bcc.targets) if probe.bcc else {}
    for hook in probe.hooks:
        failures: list[str] = []
        last_err = errno.ENOENT
        for program in hook.programs:
            target = _hook_target(program, targets)
            if isinstance(target, str):
                failures.append(target)
                continue
            function, kind, point = target
            if kind == "tracepoint" and tracefs is None:
                failures.append(f"{program}: tracefs is not mounted (bcc reads the tracepoint's format there)")
                continue
            if function not in functions:
                failures.append(f"{program}: no function {function} in {probe.bcc.source if probe.bcc else ''}")
                continue
            err, log = 0, ""
            with _captured_output() as out:
                try:
                    bpf.load_func(function.encode(), prog_types[kind])
                except Exception:  # bcc raises plain Exception; errno and the log say why
                    err = ctypes.get_errno() or errno.EINVAL
            if err:
                raise ProbeLoadError(probe.name, err, out[0] if out else "")
            with _captured_output() as out:
                try:
                    if kind == "tracepoint":
                        bpf.attach_tracepoint(tp=point.encode(), fn_name=function.encode())
                    else:
                        bpf.attach_raw_tracepoint(tp=point.encode(), fn_name=function.encode())
                except Exception as e:
                    err, log = ctypes.get_errno() or errno.EINVAL, str(e)
            if err:
                last_err = err
                detail = " ".join((out[0] if out else "").split())
                failures.append(f"{program}: {log}: {errno_text(err)}" + (f" ({detail})" if detail else ""))
                continue
            loaded.links[hook.name] = _Attachment(program, kind, point)
            break
        else:
            if hook.optional:
                continue  # e.g. a syscall this kernel lacks; the probe runs without it
            loaded.detach()
            raise ProbeAttachError(probe.name, " or ".join(hook.programs), last_err, "\n".join(failures))
