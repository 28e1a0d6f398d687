"""cgroup v2 id -> workload identity (container id, pod UID, runtime), from cgroupfs paths.

A cgroup v2 id is the inode number of its directory, so one walk of the cgroup2 mount
(``os.scandir`` hands out inode numbers without a stat) maps every id to a path, and the
path names the workload: the kubelet puts a pod's containers under a pod cgroup, and the
runtimes name container cgroups after the container id. Layouts understood, at any depth
(kind and other nested kubelets put a prefix in front):

- systemd driver: ``kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/
  cri-containerd-<id>.scope`` (``crio-<id>.scope``, ``docker-<id>.scope``; guaranteed pods are
  ``kubepods-pod<uid>.slice``; the UID's dashes are underscores in slice names);
- cgroupfs driver: ``kubepods/burstable/pod<uid>/<id>`` (CRI-O: ``crio-<id>``);
- containers outside Kubernetes: ``system.slice/docker-<id>.scope``, ``docker/<id>``,
  ``libpod-<id>.scope`` (podman).

Static pods' cgroups carry the kubelet's config hash (32 hex digits) as UID; the ingester
matches it against the mirror pod's ``kubernetes.io/config.mirror`` annotation.

Events of a cgroup that is removed before its batch is shipped still resolve when the id
was seen while it existed: ids are resolved when records are drained (every 100 ms) and
kept in a bounded LRU cache; an id not in the cache or the last walk triggers a new walk
(rate-limited).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fleetscope.codec import distinct, distinct_values

log = logging.getLogger(__name__)

# The columns this module fills, in every stream whose batch message declares them.
IDENTITY_COLUMNS = ("container_id", "pod_uid", "container_runtime", "cgroup_kind")

KIND_CONTAINER, KIND_POD, KIND_HOST = "container", "pod", "host"

_RUNTIMES = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker", "libpod": "podman"}
# a container's cgroup: "<runtime prefix>-<id>.scope" (systemd), "<id>" or "crio-<id>" (cgroupfs)
_CONTAINER = re.compile(r"(?:(cri-containerd|crio|docker|libpod)-)?([0-9a-f]{64})(?:\.scope)?")
# a pod's cgroup: "...-pod<uid>.slice" (systemd, '_' for '-') or "pod<uid>" (cgroupfs); static
# pods have a 32-digit config hash instead of a UUID
_POD_SLICE = re.compile(
    r"(?:.+-)?pod([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}|[0-9a-f]{32})\.slice"
)
_POD_DIR = re.compile(r"pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})")

MAX_WALK_DIRS = 1 << 17  # a walk stops here: bounds memory on a pathological tree


@dataclass(frozen=True)
class CgroupInfo:
    """What a cgroup's path says about its workload; kind "" means the id was not found."""

    container_id: str = ""
    pod_uid: str = ""
    container_runtime: str = ""
    cgroup_kind: str = ""


UNKNOWN = CgroupInfo()
HOST = CgroupInfo(cgroup_kind=KIND_HOST)


def child_info(parent: CgroupInfo, name: str) -> CgroupInfo:
    """The identity of cgroup directory `name` below a cgroup with identity `parent`.

    Cgroups below a container's (a container that makes its own) belong to that container.
    """
    if parent.cgroup_kind == KIND_CONTAINER:
        return parent
    m = _CONTAINER.fullmatch(name)
    if m:
        runtime = _RUNTIMES.get(m.group(1) or "", parent.container_runtime)
        return replace(parent, container_id=m.group(2), container_runtime=runtime, cgroup_kind=KIND_CONTAINER)
    m = _POD_SLICE.fullmatch(name) or _POD_DIR.fullmatch(name)
    if m:
        return replace(parent, pod_uid=m.group(1).replace("_", "-"), cgroup_kind=KIND_POD)
    if name == "docker" and parent.cgroup_kind == KIND_HOST:  # cgroupfs docker: /docker/<id>
        return replace(parent, container_runtime="docker")
    return parent


def path_info(relative: str) -> CgroupInfo:
    """The identity of a cgroup path relative to the cgroup2 mount ("" is the root)."""
    info = HOST
    for name in relative.strip("/").split("/"):
        if name:
            info = child_info(info, name)
    return info


def walk(root: Path, max_dirs: int = MAX_WALK_DIRS) -> dict[int, CgroupInfo]:
    """Every cgroup directory's id (inode) under the cgroup2 mount -> its identity."""
    out = {os.stat(root).st_ino: HOST}
    stack: list[tuple[str, CgroupInfo]] = [(str(root), HOST)]
    while stack and len(out) < max_dirs:
        path, info = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:  # removed while we walk
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            sub = child_info(info, entry.name)
            out[entry.inode()] = sub
            stack.append((entry.path, sub))
    return out


@dataclass
class ResolverStats:
    walks: int = 0
    walk_seconds: float = 0.0
    unresolved_ids: int = 0  # distinct ids looked up that no walk found


class CgroupResolver:
    """cgroup id -> CgroupInfo with a bounded cache of recently seen ids.

    Lookups run on the agent's event loop, once per distinct id of a drained chunk or
    a batch (``numpy.unique``), never per row.
    """

    def __init__(self, root: Path, max_entries: int = 16384, min_rewalk: float = 0.2) -> None:
        self.root = root
        self.max_entries = max_entries
        self.min_rewalk = min_rewalk
        self.stats = ResolverStats()
        self._seen: OrderedDict[int, CgroupInfo] = OrderedDict()
        self._tree: dict[int, CgroupInfo] = {}
        self._missing: set[int] = set()  # ids the last walk did not find (bounded by the ids seen)
        self._next_walk = 0.0  # the first lookup walks

    def _rewalk(self) -> None:
        started = time.monotonic()
        try:
            self._tree = walk(self.root)
        except OSError as e:
            log.warning("cannot walk the cgroup2 mount %s: %s; workload identity stays empty", self.root, e)
            self._tree = {}
        took = time.monotonic() - started
        self.stats.walks += 1
        self.stats.walk_seconds += took
        self._missing.clear()
        # at most ~10% of one core on walks, however often new ids appear
        self._next_walk = time.monotonic() + max(self.min_rewalk, 10 * took)

    def _lookup(self, cgroup_id: int) -> CgroupInfo | None:
        info = self._seen.get(cgroup_id)
        if info is not None:
            self._seen.move_to_end(cgroup_id)
            return info
        info = self._tree.get(cgroup_id)
        if info is None and cgroup_id not in self._missing and time.monotonic() >= self._next_walk:
            self._rewalk()
            info = self._tree.get(cgroup_id)
            if info is None and len(self._missing) < self.max_entries:
                self._missing.add(cgroup_id)  # gone already, or outside this mount: no walk for it alone
        if info is None:
            return None
        self._seen[cgroup_id] = info
        if len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return info

    def resolve(self, ids: np.ndarray) -> tuple[list[CgroupInfo], np.ndarray]:
        """Identities of the distinct ids, and each row's index into them."""
        uniq, inverse = distinct_values(np.asarray(ids, np.uint64))
        infos = []
        for u in uniq.tolist():
            info = self._lookup(u)
            if info is None:
                self.stats.unresolved_ids += 1
                info = UNKNOWN
            infos.append(info)
        return infos, inverse.ravel()

    def observe(self, ids: np.ndarray) -> None:
        """Resolve the ids of freshly drained records while their cgroups still exist."""
        if len(ids):
            for u in distinct(ids).tolist():
                self._lookup(u)

    def columns(self, ids: np.ndarray) -> dict[str, tuple[bytes, np.ndarray, np.ndarray]]:
        """The identity columns of a batch, dictionary-encoded (StringColumn's data, offsets, index)."""
        infos, inverse = self.resolve(ids)
        rows = inverse.astype("<u4")  # shared by the columns whose values differ per distinct id
        return {name: dictionary_column([getattr(i, name) for i in infos], inverse, rows) for name in IDENTITY_COLUMNS}


def dictionary_column(
    values: list[str], inverse: np.ndarray, identity: np.ndarray | None = None
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Per-distinct strings + each row's index into them -> (data, offsets, index) of a
    StringColumn whose dictionary holds each value once. identity: inverse as uint32, the
    index itself when the values are already distinct (no per-row work then)."""
    codes: dict[str, int] = {}
    index = np.fromiter((codes.setdefault(v, len(codes)) for v in values), "<u4", len(values))
    encoded = [v.encode() for v in codes]
    offsets = np.cumsum([len(e) for e in encoded], dtype=np.int64).astype("<u4")
    if not len(inverse):
        return b"".join(encoded), offsets, np.zeros(0, "<u4")
    if identity is not None and len(codes) == len(values):  # every value distinct: entry i is value i
        return b"".join(encoded), offsets, identity
    return b"".join(encoded), offsets, index[inverse]


def empty_columns(rows: int) -> dict[str, tuple[bytes, np.ndarray, np.ndarray]]:
    """Identity columns of `rows` unresolved rows (no resolver configured)."""
    inverse = np.zeros(rows, np.intp)
    return {name: dictionary_column([""] if rows else [], inverse) for name in IDENTITY_COLUMNS}
