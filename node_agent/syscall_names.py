"""Syscall numbers -> names for this machine's architecture, from libseccomp.

libseccomp (libseccomp.so.2, on virtually every Linux host: systemd, container runtimes
and sshd link it) keeps per-architecture syscall tables in step with the kernel's
syscall_*.tbl; it is the table `scmp_sys_resolver` and seccomp policies use. The running
kernel cannot tell: its BTF has no numbers and x86-64 kernels since 6.9 have no
sys_call_table. The table is read once (a few hundred calls at start-up); resolving a
column is one numpy take. Numbers the library does not know become "syscall_<nr>".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import numpy as np

__all__ = ["NAME_BYTES", "syscall_names", "syscall_table"]

log = logging.getLogger(__name__)

NAME_BYTES = 32  # longer than any syscall name
_MAX_NR = 1024  # x86-64 numbers are below 512 (x32 ones carry bit 30 and are not resolved)
_SCMP_ARCH_NATIVE = 0


@functools.cache
def syscall_table() -> np.ndarray:
    """'S32' names indexed by syscall number (b"" where unknown); empty without libseccomp."""
    path = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(path)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError as e:
        log.warning("libseccomp not found (%s): syscalls are named syscall_<nr>", e)
        return np.zeros(0, f"S{NAME_BYTES}")
    resolve = lib.seccomp_syscall_resolve_num_arch  # char *(uint32_t arch, int num), malloc'd
    resolve.restype = ctypes.c_void_p
    resolve.argtypes = [ctypes.c_uint32, ctypes.c_int]
    libc.free.argtypes = [ctypes.c_void_p]
    table = np.zeros(_MAX_NR, f"S{NAME_BYTES}")
    for nr in range(_MAX_NR):
        name = resolve(_SCMP_ARCH_NATIVE, nr)
        if name:
            table[nr] = ctypes.string_at(name)[:NAME_BYTES]
            libc.free(name)
    return table


def syscall_names(nrs: np.ndarray) -> np.ndarray:
    """Names ('S32') of a column of syscall numbers."""
    table = syscall_table()
    nrs = nrs.astype(np.int64, copy=False)
    inside = (nrs >= 0) & (nrs < len(table))
    out = np.zeros(len(nrs), f"S{NAME_BYTES}")
    out[inside] = table[nrs[inside]]
    unknown = out == b""
    if unknown.any():  # a few distinct numbers at most: name each once
        uniq, inverse = np.unique(nrs[unknown], return_inverse=True)
        named = np.array([f"syscall_{n}".encode() for n in uniq.tolist()], f"S{NAME_BYTES}")
        out[unknown] = named[inverse]
    return out
