"""Linux capabilities of the agent process: what it has, and what the probes need.

The agent needs CAP_BPF (load programs, create maps and BTF) and CAP_PERFMON (tracing
programs: tracepoints, raw_tp, tp_btf; reading kernel memory), nothing else, on kernels
5.8+ (which split them out of CAP_SYS_ADMIN; before, CAP_SYS_ADMIN is needed). Measured,
not assumed: tests/integration/test_agent_capabilities.py runs every probe with exactly
these two. Two things that would need more are avoided instead:

- libbpf looks for a CO-RE type missing from vmlinux in the kernel modules' BTF, and
  listing those (BPF_BTF_GET_NEXT_ID) needs CAP_SYS_ADMIN; Debian's libbpf 1.1 fails the
  load with EPERM then (newer ones skip the modules). Without CAP_SYS_ADMIN the loader
  points libbpf's CO-RE at the vmlinux BTF file alone (node_agent.libbpf), which is where
  every type the probes read lives.
- RLIMIT_MEMLOCK: kernels 5.11+ charge BPF memory to the cgroup, so no CAP_SYS_RESOURCE
  is needed to raise it; on older kernels give the service LimitMEMLOCK=infinity.

The agent reads root-owned files (/sys/kernel/btf/vmlinux, /sys/fs/cgroup, tracefs): run
it as uid 0 with only these capabilities (systemd CapabilityBoundingSet=), or as another
user with AmbientCapabilities= and read access to those paths (tracefs is root-only: the
probes' raw_tp programs attach without it).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "NEEDED", "effective", "missing"]

# capability bits (linux/capability.h)
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
NAMES = {CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}
NEEDED = (CAP_BPF, CAP_PERFMON)


def effective(status: str | None = None) -> int:
    """The process's effective capability mask (CapEff of /proc/self/status)."""
    text = status if status is not None else Path("/proc/self/status").read_text()
    return int(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("CapEff:")), 16)


def has(cap: int, mask: int | None = None) -> bool:
    return bool((effective() if mask is None else mask) >> cap & 1)


def missing(mask: int | None = None) -> list[str]:
    """Names of the needed capabilities the process lacks; [] also when CAP_SYS_ADMIN stands
    in for both (kernels before 5.8 check it instead)."""
    mask = effective() if mask is None else mask
    if has(CAP_SYS_ADMIN, mask):
        return []
    return [NAMES[c] for c in NEEDED if not has(c, mask)]
