"""Errors of the node agent; each says what failed, the errno name and the fix.

Retry decisions look only at `retriable`. A ProbeError disables one probe; the agent
keeps the others running and reports the message in its status.
"""

from __future__ import annotations

import errno as errno_mod
import os
from typing import ClassVar

__all__ = [
    "ProbeAttachError",
    "ProbeConfigError",
    "ProbeError",
    "ProbeLoadError",
    "RingBufferError",
    "errno_text",
]

# errno -> what to do about it, when loading (open, CO-RE, verifier, map creation)
_LOAD_FIXES = {
    errno_mod.EPERM: "not root / missing CAP_BPF,CAP_PERFMON: run the agent as root or grant them",
    errno_mod.EACCES: "the verifier rejected a program: see the verifier log below",
    errno_mod.EINVAL: "the kernel refused a program, map or btf: see the log below",
    errno_mod.E2BIG: "a program is too large or complex for the verifier: see the log below",
    errno_mod.ENOENT: "object file or kernel btf missing: build the probes with `make -C bpf`",
    errno_mod.ESRCH: "a kernel type or field was not found (co-re relocation): see the log",
    errno_mod.ENOTSUP: "the kernel lacks a feature this probe needs (ring buffer: 5.8+)",
    errno_mod.ENOMEM: "out of memory for maps: lower ring_bytes",
    errno_mod.ENOEXEC: "the object does not match this agent: rebuild it with `make -C bpf`",
}
# errno -> what to do about it, when attaching a loaded program to its hook
_ATTACH_FIXES = {
    errno_mod.EPERM: "not root / missing CAP_BPF,CAP_PERFMON: run the agent as root or grant them",
    errno_mod.ENOENT: "hook not found: the kernel lacks it, or tracefs is not mounted "
    "(classic tracepoints need /sys/kernel/tracing; raw_tp does not)",
    errno_mod.EOPNOTSUPP: "attach type not supported by this kernel (e.g. kprobes compiled out)",
    errno_mod.EINVAL: "the kernel refused the attachment: see the log below",
    errno_mod.EBUSY: "the hook is busy: retry",
}


_LOG_TAIL_LINES = 40  # of libbpf's log in the message; the whole log stays in .log


def _with_log(message: str, log: str) -> str:
    """message, then the end of the log (a verifier's verdict is at its end)."""
    lines = log.rstrip().splitlines()
    if not lines:
        return message
    if len(lines) > _LOG_TAIL_LINES:
        lines = [f"... ({len(lines) - _LOG_TAIL_LINES} earlier log lines in .log)", *lines[-_LOG_TAIL_LINES:]]
    return message + "\n" + "\n".join(lines)


def errno_text(err: int) -> str:
    """'EPERM (operation not permitted)' for an errno value."""
    name = errno_mod.errorcode.get(err, f"errno {err}")
    return f"{name} ({os.strerror(err).lower()})"


class ProbeError(Exception):
    """A probe cannot run; the agent disables it alone and reports this message."""

    retriable: ClassVar[bool] = False


class ProbeConfigError(ProbeError):
    """A probe setting is out of range or unknown; the message names it and the fix."""


class ProbeLoadError(ProbeError):
    """Opening or loading a probe object failed (file, co-re, verifier, maps)."""

    def __init__(self, probe: str, errno: int, log: str = "", *, what: str = "load") -> None:
        """Build the message from the errno; log is libbpf's output (verifier log)."""
        self.probe, self.errno, self.log = probe, errno, log
        fix = _LOAD_FIXES.get(errno, "see the log below")
        super().__init__(_with_log(f"{what} probe {probe!r} failed: {errno_text(errno)}: {fix}", log))


class ProbeAttachError(ProbeError):
    """Attaching a loaded program to its hook failed."""

    def __init__(self, probe: str, program: str, errno: int, log: str = "") -> None:
        """Build the message from the errno; log is libbpf's output during the attach."""
        self.probe, self.program, self.errno, self.log = probe, program, errno, log
        fix = _ATTACH_FIXES.get(errno, "see the log below")
        super().__init__(_with_log(f"attach {probe}:{program} failed: {errno_text(errno)}: {fix}", log))


class RingBufferError(ProbeError):
    """A ring buffer holds records that do not match its dtype (a build mismatch)."""
