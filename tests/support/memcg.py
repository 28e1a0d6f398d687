"""A memory-limited cgroup and a process that outgrows it, for tests of the OOM killer."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from node_agent.loader import cgroup2_mount
from tests.support.real import require_real

# grows by 1 MiB of touched memory at a time, far past any test limit
HOG = "chunks = []\nfor _ in range(200):\n    chunks.append(b'\\x01' * (1 << 20))\n"


@dataclass(frozen=True)
class MemoryCgroup:
    """Where a process must write its pid to be limited, and its cgroup v2 directory."""

    procs: tuple[Path, ...]  # cgroup.procs files: the memory cgroup (+ a v2 one on v1 memory)
    v2_dir: Path

    def spawn_hog(self, oom_score_adj: int = 0) -> subprocess.Popen[bytes]:
        """Start HOG (Python) inside the cgroup; the OOM killer ends it with SIGKILL."""
        joins = "; ".join(f'echo $$ > "{p}"' for p in self.procs)
        script = f'{joins}; echo {oom_score_adj} > /proc/self/oom_score_adj; exec "$0" -c "$1"'
        return subprocess.Popen(["sh", "-c", script, sys.executable, HOG])


def _v1_memory_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, fstype, options, *_ = line.split()
        if fstype == "cgroup" and "memory" in options.split(","):
            return Path(where)
    return None


@contextmanager
def memory_cgroup(limit: int) -> Iterator[MemoryCgroup]:
    """A cgroup limited to `limit` bytes without swap: cgroup v2 when its memory controller is
    available (enabled in the parent's subtree_control for the test, then restored), else
    the cgroup v1 memory hierarchy (hybrid mode) plus a plain v2 cgroup for the id."""
    root = cgroup2_mount()
    name = f"fleetscope-oom-{uuid.uuid4().hex[:8]}"
    if "memory" in (root / "cgroup.controllers").read_text().split():
        subtree = root / "cgroup.subtree_control"
        enabled_here = "memory" not in subtree.read_text().split()
        if enabled_here:
            subtree.write_text("+memory")
        cg = root / name
        cg.mkdir()
        try:
            (cg / "memory.max").write_text(str(limit))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
            yield MemoryCgroup((cg / "cgroup.procs",), cg)
        finally:
            cg.rmdir()
            if enabled_here:
                subtree.write_text("-memory")
        return
    v1 = _v1_memory_mount()
    if v1 is None:
        require_real("oom_kills probe: no memory controller in cgroup v2 or v1 to limit a process")
    mine = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in x)
    mem = v1 / mine.split(":", 2)[2].lstrip("/") / name
    v2 = root / name
    mem.mkdir()
    v2.mkdir()
    try:
        (mem / "memory.limit_in_bytes").write_text(str(limit))
        if (mem / "memory.memsw.limit_in_bytes").exists():
            (mem / "memory.memsw.limit_in_bytes").write_text(str(limit))
        yield MemoryCgroup((mem / "cgroup.procs", v2 / "cgroup.procs"), v2)
    finally:
        mem.rmdir()
        v2.rmdir()
