"""Small typed ctypes binding to libbpf.so.1 (Debian's 1.1): open, configure, load, attach.

Only control-plane calls go through here; events are read by node_agent.ringbuf straight
from the mmapped ring, so no libbpf callback ever runs per event.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from node_agent import capabilities
from node_agent.btf import Btf, BtfError
from node_agent.errors import ProbeAttachError, ProbeLoadError

__all__ = ["BpfObject", "Link", "create_map", "map_lookup", "map_update", "num_possible_cpus"]

_LIBBPF_NAME = "libbpf.so.1"

# enum libbpf_print_level
_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2
# int (*libbpf_print_fn_t)(enum libbpf_print_level, const char *fmt, va_list ap); on x86-64
# (and arm64) a va_list parameter arrives as a pointer, which vasprintf takes as is
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _OpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts of libbpf 1.1 (libbpf.h), up to kernel_log_level."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_attach_prog_fd", ctypes.c_uint32),  # removed field, kept as padding
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


_VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
_print_lock = threading.Lock()


def _fn(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> None:
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)


def _libbpf() -> ctypes.CDLL:
    """Load libbpf.so.1 once and declare the prototypes used here."""
    global _lib, _libc
    if _lib is not None:
        return _lib
    lib = ctypes.CDLL(_LIBBPF_NAME, use_errno=True)
    vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    u32, b = ctypes.c_uint32, ctypes.c_bool
    _fn(lib, "bpf_object__open_file", vp, cp, vp)
    _fn(lib, "bpf_object__load", i, vp)
    _fn(lib, "bpf_object__close", None, vp)
    _fn(lib, "bpf_object__find_map_by_name", vp, vp, cp)
    _fn(lib, "bpf_object__next_map", vp, vp, vp)
    _fn(lib, "bpf_object__find_program_by_name", vp, vp, cp)
    _fn(lib, "bpf_object__next_program", vp, vp, vp)
    _fn(lib, "bpf_map__name", cp, vp)
    _fn(lib, "bpf_map__fd", i, vp)
    _fn(lib, "bpf_map__is_internal", b, vp)
    _fn(lib, "bpf_map__set_max_entries", i, vp, u32)
    _fn(lib, "bpf_map__reuse_fd", i, vp, i)
    _fn(lib, "bpf_map__value_size", u32, vp)
    _fn(lib, "bpf_map__initial_value", vp, vp, ctypes.POINTER(ctypes.c_size_t))
    _fn(lib, "bpf_program__name", cp, vp)
    _fn(lib, "bpf_program__set_autoload", i, vp, b)
    _fn(lib, "bpf_program__autoload", b, vp)
    _fn(lib, "bpf_program__fd", i, vp)
    _fn(lib, "bpf_program__attach", vp, vp)
    _fn(lib, "bpf_link__destroy", i, vp)
    _fn(lib, "bpf_map_lookup_elem", i, i, vp, vp)
    _fn(lib, "bpf_map_update_elem", i, i, vp, vp, ctypes.c_uint64)
    _fn(lib, "bpf_map_create", i, i, cp, u32, u32, u32, vp)
    _fn(lib, "libbpf_num_possible_cpus", i)
    _fn(lib, "libbpf_set_print", vp, _PRINT_FN)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _fn(libc, "vasprintf", i, ctypes.POINTER(ctypes.c_void_p), cp, vp)
    _fn(libc, "free", None, vp)
    _lib, _libc = lib, libc
    return lib


def num_possible_cpus() -> int:
    """Possible CPUs: per-CPU map values come back as this many slots."""
    n = int(_libbpf().libbpf_num_possible_cpus())
    if n <= 0:
        raise OSError(-n, "libbpf_num_possible_cpus failed")
    return n


def create_map(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """bpf_map_create: a new map's fd (the caller closes it). OSError with the errno."""
    fd = int(_libbpf().bpf_map_create(map_type, name.encode()[:15], key_size, value_size, max_entries, None))
    if fd < 0:
        raise OSError(_err(fd), f"creating map {name!r} failed")
    return fd


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes:
    """bpf_map_lookup_elem on a map fd; per-CPU maps return one slot per possible CPU."""
    buf = ctypes.create_string_buffer(value_size)
    ret = _libbpf().bpf_map_lookup_elem(fd, key, buf)
    if ret:
        raise OSError(_err(ret), f"lookup in map fd {fd} failed")
    return buf.raw


def map_update(fd: int, key: bytes, value: bytes) -> None:
    """bpf_map_update_elem(BPF_ANY) on a map fd."""
    ret = _libbpf().bpf_map_update_elem(fd, key, value, 0)
    if ret:
        raise OSError(_err(ret), f"update of map fd {fd} failed")


def _err(ret: int) -> int:
    """errno of a failed libbpf call (negative return, else the saved errno)."""
    return -ret if ret < 0 else (ctypes.get_errno() or errno_mod.EINVAL)


@contextmanager
def _capture_libbpf_log() -> Iterator[list[str]]:
    """Collect libbpf's warnings and info lines (verifier log included) while inside."""
    lib = _libbpf()
    libc = _libc
    lines: list[str] = []

    def on_print(level: int, fmt: bytes | None, args: int | None) -> int:
        # never raise here: this runs inside a C callback
        try:
            if level == _LIBBPF_DEBUG or fmt is None or libc is None:
                return 0
            out = ctypes.c_void_p()
            n = libc.vasprintf(ctypes.byref(out), fmt, args)
            if n >= 0 and out.value:
                lines.append(ctypes.string_at(out.value, n).decode(errors="replace"))
                libc.free(out)
        except Exception:  # the log is best effort; the errno still reaches the caller
            pass
        return 0

    callback = _PRINT_FN(on_print)
    with _print_lock:
        previous = lib.libbpf_set_print(callback)
        try:
            yield lines
        finally:
            lib.libbpf_set_print(ctypes.cast(previous, _PRINT_FN) if previous else _PRINT_FN())


class Link:
    """An attached program; destroy() detaches it (idempotent)."""

    def __init__(self, program: str, ptr: int) -> None:
        """Wrap a struct bpf_link * returned by bpf_program__attach."""
        self.program = program
        self._ptr: int | None = ptr

    @property
    def attached(self) -> bool:
        """Whether the link still holds its hook."""
        return self._ptr is not None

    def destroy(self) -> None:
        """Detach the program from its hook."""
        if self._ptr is not None:
            _libbpf().bpf_link__destroy(self._ptr)
            self._ptr = None


class BpfObject:
    """One .bpf.o: configure (rodata, map sizes, autoload) before load(), then attach."""

    def __init__(self, path: Path, ptr: int, name: str) -> None:
        """Use BpfObject.open(path)."""
        self.path, self.name = path, name
        self._ptr: int | None = ptr
        self._loaded = False
        self._links: list[Link] = []
        self._btf: Btf | None = None

    @classmethod
    def open(cls, path: str | Path, name: str | None = None) -> BpfObject:
        """Open (parse, not load) an object file; name labels errors (default: stem)."""
        path = Path(path)
        label = name or path.name.removesuffix(".o").removesuffix(".bpf")
        if not path.is_file():
            raise ProbeLoadError(label, errno_mod.ENOENT, f"{path}: no such file", what="open")
        lib = _libbpf()
        opts = None
        if not capabilities.has(capabilities.CAP_SYS_ADMIN) and Path(_VMLINUX_BTF).exists():
            # CO-RE candidates from vmlinux only: libbpf 1.1 would list the modules' BTF for a
            # type vmlinux lacks (a ___old flavour), which needs CAP_SYS_ADMIN (capabilities.py)
            opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts), btf_custom_path=_VMLINUX_BTF.encode())
        with _capture_libbpf_log() as log:
            ptr = lib.bpf_object__open_file(str(path).encode(), ctypes.byref(opts) if opts else None)
            err = ctypes.get_errno()
        if not ptr:
            raise ProbeLoadError(label, err or errno_mod.EINVAL, "".join(log), what="open")
        return cls(path, ptr, label)

    @property
    def btf(self) -> Btf:
        """The object's own BTF (record structs, .rodata layout)."""
        if self._btf is None:
            self._btf = Btf.from_file(self.path)
        return self._btf

    @property
    def loaded(self) -> bool:
        """Whether load() succeeded."""
        return self._loaded

    def _obj(self) -> int:
        if self._ptr is None:
            raise ValueError(f"bpf object {self.name} is closed")
        return self._ptr

    def _unloaded(self, what: str) -> int:
        if self._loaded:
            raise ValueError(f"{what}: bpf object {self.name} is already loaded")
        return self._obj()

    def _map(self, name: str) -> int:
        ptr = _libbpf().bpf_object__find_map_by_name(self._obj(), name.encode())
        if not ptr:
            raise KeyError(f"no map {name!r} in {self.path.name}")
        return int(ptr)

    def _program(self, name: str) -> int:
        ptr = _libbpf().bpf_object__find_program_by_name(self._obj(), name.encode())
        if not ptr:
            raise KeyError(f"no program {name!r} in {self.path.name}")
        return int(ptr)

    def program_names(self) -> list[str]:
        """Names of the object's programs, in ELF order."""
        lib, names = _libbpf(), []
        prog: int | None = None
        while prog := lib.bpf_object__next_program(self._obj(), prog):
            names.append(lib.bpf_program__name(prog).decode())
        return names

    def set_rodata(self, **values: int | bytes) -> None:
        """Write `const volatile` globals into .rodata's initial value (before load)."""
        obj, lib = self._unloaded("set_rodata"), _libbpf()
        if not values:
            return
        try:
            layout = self.btf.datasec_vars(".rodata")
        except BtfError as e:
            raise KeyError(f"{self.path.name}: no .rodata variables ({e})") from None
        rodata: int | None = None
        m: int | None = None
        while m := lib.bpf_object__next_map(obj, m):
            if lib.bpf_map__is_internal(m) and lib.bpf_map__name(m).endswith(b".rodata"):
                rodata = m
                break
        if rodata is None:
            raise KeyError(f"{self.path.name}: no .rodata map")
        size = ctypes.c_size_t()
        base = lib.bpf_map__initial_value(rodata, ctypes.byref(size))
        for key, value in values.items():
            if key not in layout:
                raise KeyError(f"{self.path.name}: no const volatile {key!r} in .rodata")
            offset, width = layout[key]
            if isinstance(value, bytes):
                raw = value.ljust(width, b"\0")
                if len(raw) != width:
                    raise ValueError(f"{key}: {len(value)} bytes do not fit its {width}")
            else:
                signed = value < 0
                try:
                    raw = value.to_bytes(width, "little", signed=signed)
                except OverflowError:
                    raise ValueError(f"{key}: {value} does not fit in {width} bytes") from None
            if not base or offset + width > size.value:
                raise ValueError(f"{key}: outside .rodata ({offset}+{width} > {size.value})")
            ctypes.memmove(base + offset, raw, width)

    def set_max_entries(self, map_name: str, n: int) -> None:
        """Size a map before load (ring buffers: bytes, power of two, page multiple)."""
        self._unloaded("set_max_entries")
        ret = _libbpf().bpf_map__set_max_entries(self._map(map_name), n)
        if ret:
            raise ValueError(f"set_max_entries({map_name}, {n}): {errno_mod.errorcode[-ret]}")

    def reuse_map(self, map_name: str, fd: int) -> None:
        """Use another object's map (by fd) instead of creating this one at load, so both
        objects' programs see the same entries; the map definitions must agree."""
        self._unloaded("reuse_map")
        ret = _libbpf().bpf_map__reuse_fd(self._map(map_name), fd)
        if ret:
            raise ValueError(f"reuse_map({map_name}): {errno_mod.errorcode.get(-ret, ret)}")

    def set_autoload(self, prog_name: str, enabled: bool) -> None:
        """Keep a program out of load() (e.g. its hook is missing on this kernel)."""
        self._unloaded("set_autoload")
        ret = _libbpf().bpf_program__set_autoload(self._program(prog_name), enabled)
        if ret:
            raise ValueError(f"set_autoload({prog_name}): {errno_mod.errorcode[-ret]}")

    def load(self) -> None:
        """Create maps, relocate (CO-RE) and verify every autoloaded program."""
        obj = self._unloaded("load")
        with _capture_libbpf_log() as log:
            ret = _libbpf().bpf_object__load(obj)
        if ret:
            raise ProbeLoadError(self.name, _err(ret), "".join(log))
        self._loaded = True

    def attach(self, prog_name: str) -> Link:
        """Attach one loaded program by its section's attach point; returns its link."""
        prog = self._program(prog_name)
        if not self._loaded:
            raise ValueError(f"attach({prog_name}): bpf object {self.name} is not loaded")
        with _capture_libbpf_log() as log:
            ptr = _libbpf().bpf_program__attach(prog)
            err = ctypes.get_errno()
        if not ptr:
            raise ProbeAttachError(self.name, prog_name, err or errno_mod.EINVAL, "".join(log))
        link = Link(prog_name, ptr)
        self._links.append(link)
        return link

    def attach_all(self) -> dict[str, Link]:
        """Attach every autoloaded program; on failure, detach those already attached."""
        lib, links = _libbpf(), {}
        try:
            for name in self.program_names():
                if lib.bpf_program__autoload(self._program(name)):
                    links[name] = self.attach(name)
        except ProbeAttachError:
            for link in links.values():
                link.destroy()
            raise
        return links

    def map_fd(self, name: str) -> int:
        """File descriptor of a map (valid after load, owned by this object)."""
        fd = int(_libbpf().bpf_map__fd(self._map(name)))
        if fd < 0:
            raise ValueError(f"map {name!r} has no fd: object {self.name} not loaded")
        return fd

    def map_value_size(self, name: str) -> int:
        """Declared value size of a map, in bytes."""
        return int(_libbpf().bpf_map__value_size(self._map(name)))

    def lookup(self, map_name: str, key: bytes, value_size: int) -> bytes:
        """bpf_map_lookup_elem on a map; per-CPU maps return one slot per possible CPU."""
        buf = ctypes.create_string_buffer(value_size)
        ret = _libbpf().bpf_map_lookup_elem(self.map_fd(map_name), key, buf)
        if ret:
            raise OSError(_err(ret), f"lookup in map {map_name!r} failed")
        return buf.raw

    def update(self, map_name: str, key: bytes, value: bytes) -> None:
        """bpf_map_update_elem(BPF_ANY) on a loaded map."""
        ret = _libbpf().bpf_map_update_elem(self.map_fd(map_name), key, value, 0)
        if ret:
            raise OSError(_err(ret), f"update of map {map_name!r} failed")

    def detach(self) -> None:
        """Destroy every link made by attach(); the programs stay loaded."""
        for link in self._links:
            link.destroy()
        self._links.clear()

    def close(self) -> None:
        """Detach and free everything (maps, programs); safe to call twice."""
        self.detach()
        if self._ptr is not None:
            _libbpf().bpf_object__close(self._ptr)
            self._ptr = None
            self._loaded = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
