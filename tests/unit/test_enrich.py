"""Pod cache (workloads, deleted pods) and the per-batch enrichment columns, into ClickHouse."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fleetscope.codec import SCHEMAS, DecodedBatch, decode_batch, encode_batch
from fleetscope.config import IngestSettings
from fleetscope.v1 import batch_pb2
from ingester.enrich import Enricher
from ingester.enrich.pods import OwnerRecord, OwnerRef, PodCache, PodRecord
from node_agent.cgroups import dictionary_column

A, B, C = "a" * 64, "b" * 64, "c" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rs_pod(uid: str, name: str, rs: str, rs_uid: str, hash_: str = "") -> PodRecord:
    return PodRecord(uid, "shop", name, owner=OwnerRef("ReplicaSet", rs, rs_uid), pod_template_hash=hash_)


def test_workloads_follow_owner_references() -> None:
    c = PodCache(60)
    c.upsert_owner("rs1", OwnerRecord("ReplicaSet", "web-5d8f", OwnerRef("Deployment", "web", "d1")))
    c.upsert_owner("rs2", OwnerRecord("ReplicaSet", "bare", None))
    c.upsert_owner("j1", OwnerRecord("Job", "report-29000000", OwnerRef("CronJob", "report", "cj1")))
    c.upsert_owner("j2", OwnerRecord("Job", "migrate", None))
    cases = [
        (rs_pod("p1", "web-5d8f-x", "web-5d8f", "rs1"), ("Deployment", "web")),
        (rs_pod("p2", "bare-x", "bare", "rs2"), ("ReplicaSet", "bare")),
        # a ReplicaSet the watch has not delivered (or may not list): the naming rule
        (rs_pod("p3", "api-7c9-x", "api-7c9", "rs-unknown", "7c9"), ("Deployment", "api")),
        (rs_pod("p4", "odd-x", "odd", "rs-unknown", "7c9"), ("ReplicaSet", "odd")),
        (PodRecord("p5", "b", "report-29000000-q", owner=OwnerRef("Job", "report-29000000", "j1")),
         ("CronJob", "report")),
        (PodRecord("p6", "b", "migrate-q", owner=OwnerRef("Job", "migrate", "j2")), ("Job", "migrate")),
        (PodRecord("p7", "b", "db-0", owner=OwnerRef("StatefulSet", "db", "s1")), ("StatefulSet", "db")),
        (PodRecord("p8", "b", "agent-x", owner=OwnerRef("DaemonSet", "agent", "ds1")), ("DaemonSet", "agent")),
        (PodRecord("p9", "b", "debug"), ("Pod", "debug")),
        (PodRecord("p10", "kube-system", "etcd-n1", owner=OwnerRef("Node", "n1", "n")), ("Pod", "etcd-n1")),
    ]  # fmt: skip
    for pod, expected in cases:
        assert c.workload(pod) == expected, pod.name


def test_deleted_pods_stay_for_the_grace_period_and_relists_keep_them() -> None:
    clock = Clock()
    c = PodCache(60, clock)
    c.upsert(PodRecord("u1", "ns", "one", containers={A: ("app", "containerd")}))
    c.upsert(PodRecord("u2", "ns", "two", mirror_uid="6b1f0b5d8e3c4a2f9e8d7c6b5a4f3e2d"))
    c.sync([PodRecord("u2", "ns", "two", mirror_uid="6b1f0b5d8e3c4a2f9e8d7c6b5a4f3e2d")])  # u1 gone meanwhile
    assert c.pod("u1") is not None and c.pod("u1").deleted_at == 1000.0  # type: ignore[union-attr]
    assert c.pod_of_container(A).name == "one"  # type: ignore[union-attr]
    assert c.pod("6b1f0b5d8e3c4a2f9e8d7c6b5a4f3e2d").name == "two"  # type: ignore[union-attr]
    clock.now += 59
    assert c.expire() == 0
    clock.now += 2
    assert c.expire() == 1
    assert c.pod("u1") is None and c.pod_of_container(A) is None and c.pod("u2") is not None


def identity_batch(rows: list[tuple[str, str, str, str]], node: str = "node-7") -> DecodedBatch:
    """A process_exit batch whose rows have these (container_id, pod_uid, runtime, kind)."""
    n = len(rows)
    h = batch_pb2.BatchHeader(stream="process_exit", batch_id="b-1", row_count=n, created_ns=time.time_ns())
    h.node.host_name = node
    cols: dict[str, object] = {
        "time": np.full(n, time.time_ns(), np.uint64), "pid": np.arange(n, dtype=np.uint32),
        "ppid": np.ones(n, np.uint32), "cgroup_id": np.arange(n, dtype=np.uint64),
        "comm": np.array([b"sh"] * n), "exit_code": np.zeros(n, np.int32), "signal": np.zeros(n, np.uint32),
        "duration_ns": np.ones(n, np.uint64),
    }  # fmt: skip
    for j, name in enumerate(("container_id", "pod_uid", "container_runtime", "cgroup_kind")):
        distinct = sorted({r[j] for r in rows})
        cols[name] = dictionary_column(distinct, np.array([distinct.index(r[j]) for r in rows], np.intp))
    return decode_batch(SCHEMAS["process_exit"], encode_batch(SCHEMAS["process_exit"], h, cols))  # type: ignore[arg-type]


@pytest.fixture
def enricher() -> Enricher:
    e = Enricher(IngestSettings(k8s_api="kubeconfig"))  # not started: the test fills the cache
    e.cache.upsert_owner("rs1", OwnerRecord("ReplicaSet", "web-5d8f", OwnerRef("Deployment", "web", "d1")))
    e.cache.upsert(PodRecord(
        "u-web", "shop", "web-5d8f-x", node="n1", ip="10.0.0.9", labels={"tier": "fe"},
        annotations={"owner": "pay"}, service_name="webshop", owner=OwnerRef("ReplicaSet", "web-5d8f", "rs1"),
        containers={A: ("app", "containerd"), B: ("envoy", "containerd")},
    ))  # fmt: skip
    return e


def test_batch_columns_are_built_per_distinct_identity(enricher: Enricher) -> None:
    rows = [
        (A, "u-web", "containerd", "container"),
        ("", "", "", "host"),
        (B, "u-web", "", "container"),  # cgroupfs containerd: the runtime comes from the API
        (C, "u-unknown", "cri-o", "container"),
        ("", "", "", ""),  # a cgroup the agent could not resolve
    ] * 1000
    out = enricher.lookup(identity_batch(rows))
    assert out is not None and len(out.identities) == 5
    col = {n: v.decoded().tolist() for n, v in out.columns.items() if hasattr(v, "decoded") and n != "k8s_labels"}
    assert col["k8s_pod"][:5] == ["web-5d8f-x", "", "web-5d8f-x", "", ""]
    assert col["k8s_container"][:5] == ["app", "", "envoy", "", ""]
    assert col["k8s_workload_kind"][:5] == ["Deployment", "", "Deployment", "", ""]
    assert col["k8s_workload"][:5] == ["web", "", "web", "", ""]
    assert col["k8s_node"][:5] == ["n1", "", "n1", "", ""]
    assert col["container_runtime"][:5] == ["containerd", "", "containerd", "cri-o", ""]
    assert out.columns["enriched"].tolist()[:5] == [1, 1, 1, 0, 0]  # type: ignore[union-attr]
    assert out.unenriched == 2000
    labels = out.columns["k8s_labels"]
    assert len(labels.offsets) == 5000 and labels.offsets[:5].tolist() == [1, 1, 2, 2, 2]  # type: ignore[union-attr]
    assert len(labels.keys.offsets) == 1  # type: ignore[union-attr]  # one distinct key, one entry per row
    assert [i.pod_uid for i in out.pending] == ["u-unknown"]


def test_enrichment_columns_load_into_clickhouse(enricher: Enricher, tmp_path: Path) -> None:
    from fleetscope.store import connect, migrate
    from ingester.load import BatchLoader

    client = connect(f"chdb://{tmp_path}")
    migrate(client)
    loader = BatchLoader(client)
    batch = identity_batch([(A, "u-web", "containerd", "container"), (C, "u-unknown", "", "container")] * 3)
    out = enricher.lookup(batch)
    assert out is not None
    assert loader.insert(batch, out.columns).rows_written == 6
    rows = client.query(
        "SELECT k8s_namespace, k8s_pod, k8s_container, k8s_workload_kind, k8s_workload, container_id, pod_uid, "
        "k8s_labels, k8s_annotations, enriched FROM fleet.process_exit ORDER BY pid"
    ).result_rows
    loader.close()
    assert rows[0] == ("shop", "web-5d8f-x", "app", "Deployment", "web", A, "u-web", {"tier": "fe"},
                       {"owner": "pay"}, 1)  # fmt: skip
    assert rows[1] == ("", "", "", "", "", C, "u-unknown", {}, {}, 0)
    assert rows[2:] == rows[:2] * 2
