"""The ingester's pod metadata cache: pod UID and container id -> pod, workload, node.

Filled by the Kubernetes watch (ingester/enrich/watch.py), read once per distinct identity
of a batch. Deleted pods stay for a grace period, because their events arrive late; a
relist marks pods it no longer sees as deleted instead of dropping them.

Workloads follow ownerReferences: a pod's controller ReplicaSet or Job is looked up in the
owners this cache also holds (ReplicaSets and Jobs are watched too), so ReplicaSet ->
Deployment and Job -> CronJob come from the API, not from names. A ReplicaSet not (yet)
known falls back to the pod-template-hash naming rule (Deployment "<name>" owns ReplicaSet
"<name>-<pod-template-hash>").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# containerStatuses[].containerID is "<runtime>://<id>"; the agent names runtimes like this
RUNTIME_SCHEMES = {"containerd": "containerd", "cri-o": "cri-o", "docker": "docker", "podman": "podman"}
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"  # static pods: the UID in their cgroup path
SERVICE_NAME_LABEL = "app.kubernetes.io/name"


@dataclass(frozen=True)
class OwnerRef:
    """An object's controller owner (the ownerReference with controller: true)."""

    kind: str
    name: str
    uid: str


@dataclass
class PodRecord:
    """What the cache keeps of one pod (selected labels and annotations only)."""

    uid: str
    namespace: str
    name: str
    node: str = ""
    ip: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    service_name: str = ""  # the app.kubernetes.io/name label
    owner: OwnerRef | None = None
    pod_template_hash: str = ""
    mirror_uid: str = ""  # static pods' config hash
    containers: dict[str, tuple[str, str]] = field(default_factory=dict)  # container id -> (name, runtime)
    deleted_at: float | None = None


@dataclass
class OwnerRecord:
    """A ReplicaSet or Job: enough to follow its own controller owner."""

    kind: str
    name: str
    owner: OwnerRef | None
    deleted_at: float | None = None


def split_container_id(text: str) -> tuple[str, str]:
    """ "containerd://<id>" -> (id, "containerd"); "" when the container has not started."""
    scheme, sep, cid = text.partition("://")
    if not sep:
        return text, ""
    return cid, RUNTIME_SCHEMES.get(scheme, scheme)


class PodCache:
    """Pods by UID (and static pods by config hash), container id -> pod, and owners.

    Single-threaded: the watch tasks write and the enricher reads on the event loop.
    Memory: every pod the selectors admit plus the pods deleted within the grace period.
    """

    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self.clock = clock
        self.pods: dict[str, PodRecord] = {}
        self.owners: dict[str, OwnerRecord] = {}
        self._by_container: dict[str, str] = {}
        self._by_mirror: dict[str, str] = {}
        self.generation = 0  # bumped by every change; waiters compare it

    # --- writes (the watch) ---------------------------------------------------------------

    def upsert(self, pod: PodRecord) -> None:
        old = self.pods.get(pod.uid)
        if old is not None and old.mirror_uid and old.mirror_uid != pod.mirror_uid:
            self._by_mirror.pop(old.mirror_uid, None)
        if old is not None:  # containers keep their pod after a restart replaced them
            pod.containers = {**old.containers, **pod.containers}
        self.pods[pod.uid] = pod
        for cid in pod.containers:
            self._by_container[cid] = pod.uid
        if pod.mirror_uid:
            self._by_mirror[pod.mirror_uid] = pod.uid
        self.generation += 1

    def delete(self, uid: str) -> None:
        pod = self.pods.get(uid)
        if pod is not None and pod.deleted_at is None:
            pod.deleted_at = self.clock()
            self.generation += 1

    def sync(self, pods: Iterable[PodRecord]) -> None:
        """A full list: upsert every pod; those it lacks were deleted meanwhile."""
        seen = set()
        for pod in pods:
            self.upsert(pod)
            seen.add(pod.uid)
        for uid in [u for u in self.pods if u not in seen]:
            self.delete(uid)

    def upsert_owner(self, uid: str, owner: OwnerRecord) -> None:
        self.owners[uid] = owner
        self.generation += 1

    def delete_owner(self, uid: str) -> None:
        rec = self.owners.get(uid)
        if rec is not None and rec.deleted_at is None:
            rec.deleted_at = self.clock()

    def sync_owners(self, kind: str, owners: Iterable[tuple[str, OwnerRecord]]) -> None:
        seen = set()
        for uid, rec in owners:
            self.upsert_owner(uid, rec)
            seen.add(uid)
        for uid in [u for u, r in self.owners.items() if r.kind == kind and u not in seen]:
            self.delete_owner(uid)

    def expire(self) -> int:
        """Forget pods and owners deleted longer ago than the grace period; returns pods dropped."""
        cutoff = self.clock() - self.grace
        gone = [uid for uid, p in self.pods.items() if p.deleted_at is not None and p.deleted_at <= cutoff]
        for uid in gone:
            pod = self.pods.pop(uid)
            for cid in pod.containers:
                if self._by_container.get(cid) == uid:
                    del self._by_container[cid]
            if pod.mirror_uid and self._by_mirror.get(pod.mirror_uid) == uid:
                del self._by_mirror[pod.mirror_uid]
        for uid in [u for u, r in self.owners.items() if r.deleted_at is not None and r.deleted_at <= cutoff]:
            del self.owners[uid]
        return len(gone)

    # --- reads (the enricher) -------------------------------------------------------------

    def pod(self, uid: str) -> PodRecord | None:
        """By pod UID, or by a static pod's config hash (what its cgroup path carries)."""
        pod = self.pods.get(uid)
        if pod is None and (real := self._by_mirror.get(uid.replace("-", ""))) is not None:
            pod = self.pods.get(real)
        return pod

    def pod_of_container(self, container_id: str) -> PodRecord | None:
        uid = self._by_container.get(container_id)
        return self.pods.get(uid) if uid is not None else None

    def workload(self, pod: PodRecord) -> tuple[str, str]:
        """(kind, name) of the pod's top controller: Deployment, StatefulSet, DaemonSet,
        CronJob, Job, ReplicaSet, or ("Pod", its name) for bare and static pods."""
        o = pod.owner
        if o is None or o.kind == "Node":
            return "Pod", pod.name
        if o.kind in ("ReplicaSet", "Job"):
            rec = self.owners.get(o.uid)
            if rec is not None:
                return (rec.owner.kind, rec.owner.name) if rec.owner is not None else (o.kind, o.name)
            suffix = f"-{pod.pod_template_hash}"
            if o.kind == "ReplicaSet" and pod.pod_template_hash and o.name.endswith(suffix):
                return "Deployment", o.name.removesuffix(suffix)
        return o.kind, o.name
