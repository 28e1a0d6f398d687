"""File opens through every open syscall, with what the file_open probe must record for
each; shared by the in-process tests and the private-tracefs subprocess."""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

AT_FDCWD = -100
# 64-bit syscall numbers that the libc wrappers do not reach (os.open is openat)
_NUMBERS = {"x86_64": {"open": 2, "creat": 85, "openat2": 437}, "aarch64": {"openat2": 437}}
NUMBERS = _NUMBERS.get(platform.machine(), {})
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class Opened:
    """One open this process made, as the probe must report it."""

    path: str
    syscall: str
    flags: int
    mode: int
    ret: int  # fd or -errno
    dfd: int = AT_FDCWD

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sys(name: str, *args: Any) -> int:
    """Raw syscall; -errno on failure, like the kernel's return value."""
    ret = _libc.syscall(ctypes.c_long(NUMBERS[name]), *args)
    return -ctypes.get_errno() if ret < 0 else int(ret)


def _close(ret: int) -> None:
    if ret >= 0:
        os.close(ret)


def openat(path: str, flags: int, mode: int = 0) -> Opened:
    try:
        ret = os.open(path, flags, mode)
    except OSError as e:
        ret = -(e.errno or 0)
    _close(ret)
    return Opened(path, "openat", flags | os.O_CLOEXEC, mode, ret)  # Python adds O_CLOEXEC


def open_everything(watched: Path, outside: Path, n_missing: int = 50) -> list[Opened]:
    """Missing files (ENOENT), files under `watched` and under `outside`, through openat,
    and open, creat and openat2 where the architecture has them."""
    out = [openat(f"{watched}/missing-{i}", os.O_RDONLY) for i in range(n_missing)]
    for d in (watched, outside):
        out.append(openat(f"{d}/present", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644))
    out.append(openat(f"{watched}/present", os.O_RDONLY))
    out.append(openat(f"{watched}/created", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640))
    out.append(openat(f"{outside}/present", os.O_RDONLY))
    out.append(openat(f"{watched}/present", os.O_WRONLY | os.O_DIRECTORY))  # ENOTDIR
    if "open" in NUMBERS:
        for path, flags in ((f"{watched}/open-missing", os.O_RDONLY), (f"{watched}/present", os.O_RDWR)):
            ret = _sys("open", path.encode(), flags, 0)
            _close(ret)
            out.append(Opened(path, "open", flags, 0, ret))
    if "creat" in NUMBERS:
        for path in (f"{watched}/no-such-dir/c", f"{watched}/creat-new"):
            ret = _sys("creat", path.encode(), 0o600)
            _close(ret)
            out.append(Opened(path, "creat", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600, ret))
    if "openat2" in NUMBERS:
        dfd = os.open(str(watched), os.O_RDONLY | os.O_DIRECTORY)
        out.append(Opened(str(watched), "openat", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, dfd))
        try:
            names = (f"{watched.parent.name}-missing2", f"{watched.parent.name}-made2")
            for name, flags, mode in ((names[0], os.O_RDONLY, 0), (names[1], os.O_CREAT | os.O_RDWR, 0o604)):
                how = struct.pack("<QQQ", flags, mode, 0)  # struct open_how
                ret = _sys("openat2", dfd, name.encode(), how, len(how))
                _close(ret)
                # relative to dfd: under the prefix only by its directory, not its string
                out.append(Opened(name, "openat2", flags, mode, ret, dfd))
        finally:
            os.close(dfd)
    return out


def captured(opens: list[Opened], prefixes: tuple[str, ...], capture_all: bool) -> list[Opened]:
    """The opens the probe records: failures, paths under a prefix, or all."""
    return [o for o in opens if capture_all or o.ret < 0 or o.path.startswith(prefixes)]


def rows_as_opened(rows: Any) -> list[Opened]:
    """file_open_event records -> Opened, to compare with what was done."""
    names = ("openat", "openat2", "open", "creat")
    out = []
    for r in rows:
        path, syscall = bytes(r["path"]).decode(), names[int(r["syscall"])]
        out.append(Opened(path, syscall, int(r["flags"]), int(r["mode"]), int(r["ret"]), int(r["dfd"])))
    return out
