"""Kubelet-shaped cgroups under the cgroup2 mount, and processes run inside them.

Paths are exactly what the kubelet and the runtimes create, under a directory of the
test's own (``<mount>/fleetscope-k8s-<random>/``, as a nested kubelet such as kind's puts
a prefix in front), so a real kubelet's ``kubepods`` on the machine is left alone.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from node_agent.loader import cgroup2_mount

SCOPE_PREFIX = {"containerd": "cri-containerd", "cri-o": "crio", "docker": "docker"}


@dataclass(frozen=True)
class Container:
    """A container's identity as the kubelet and the API server show it."""

    pod_uid: str
    name: str
    container_id: str  # 64 hex digits
    runtime: str  # containerd, cri-o or docker
    cgroup: Path

    @property
    def status_id(self) -> str:
        """containerStatuses[].containerID: "<runtime>://<id>"."""
        return f"{self.runtime}://{self.container_id}"

    @property
    def cgroup_id(self) -> int:
        return os.stat(self.cgroup).st_ino


def container_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


class KubePods:
    """Creates pod and container cgroups below one test root; removes them all at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: list[Path] = []

    def _mkdir(self, path: Path) -> Path:
        for p in reversed([path, *path.parents]):
            if (p == self.root or self.root in p.parents) and not p.exists():
                p.mkdir()
                self.created.append(p)
        return path

    def container(
        self, pod_uid: str, name: str, runtime: str = "containerd", driver: str = "systemd", qos: str = "burstable"
    ) -> Container:
        """A container cgroup as the kubelet's systemd or cgroupfs driver lays it out."""
        cid = container_id()
        if driver == "systemd":
            base = self.root / "kubepods.slice"
            if qos == "guaranteed":
                pod_dir = base / f"kubepods-pod{pod_uid.replace('-', '_')}.slice"
            else:
                base = base / f"kubepods-{qos}.slice"
                pod_dir = base / f"kubepods-{qos}-pod{pod_uid.replace('-', '_')}.slice"
            leaf = pod_dir / f"{SCOPE_PREFIX[runtime]}-{cid}.scope"
        else:
            base = self.root / "kubepods"
            pod_dir = (base if qos == "guaranteed" else base / qos) / f"pod{pod_uid}"
            leaf = pod_dir / (f"crio-{cid}" if runtime == "cri-o" else cid)
        return Container(pod_uid, name, cid, runtime, self._mkdir(leaf))

    def remove(self) -> None:
        for p in sorted(self.created, key=lambda p: len(p.parts), reverse=True):
            with suppress(OSError):
                p.rmdir()
        self.created.clear()


@contextmanager
def kubepods() -> Iterator[KubePods]:
    root = cgroup2_mount() / f"fleetscope-k8s-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    pods = KubePods(root)
    try:
        yield pods
    finally:
        pods.remove()
        root.rmdir()


def run_in(cgroup: Path, *argv: str) -> subprocess.Popen[bytes]:
    """Start argv inside the cgroup: a shell joins it, then execs argv (that exec is in it)."""
    script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
    return subprocess.Popen(["/bin/sh", "-c", script, str(cgroup), *argv])


def run_marker(cgroup: Path, marker: str) -> int:
    """`/bin/sh -c 'exit 0' MARKER` inside the cgroup, to completion; returns its pid."""
    p = run_in(cgroup, "/bin/sh", "-c", "exit 0", marker)
    assert p.wait() == 0
    return p.pid
