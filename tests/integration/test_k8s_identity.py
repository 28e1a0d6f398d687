"""Pod identity end to end: kubelet-shaped cgroups -> agent -> Kafka -> ingester + Kubernetes API.

Real eBPF probe, real Apache Kafka, real `fleetscope agent` and `fleetscope ingest`
processes, the real client library (lightkube) in the ingester talking to the test API
server (tests/support/k8s_api.py) in the real wire format, and the store read through
`fleetscope serve-sql` while everything runs. Processes run in cgroups laid out as the
kubelet's systemd and cgroupfs drivers do for containerd, CRI-O and Docker; the rows they
cause must name their namespace, pod, container and workload.
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import clickhouse_connect
import pytest

from fleetscope import metrics
from tests.support import k8s_api
from tests.support.k8s_api import K8sApiServer, new_uid
from tests.support.kubepods import Container, KubePods, kubepods, run_marker
from tests.support.procs import FleetscopeProcess
from tests.support.sql_http import ServeSql, wait_until

pytestmark = [pytest.mark.root, pytest.mark.kafka, pytest.mark.integration]

# the ingester's log line when its pod watch fails (and, with it, all waiting for pods)
API_DOWN = "rows of unknown pods are written unenriched"
COLUMNS = (
    "k8s_namespace", "k8s_pod", "k8s_container", "k8s_workload_kind", "k8s_workload", "k8s_node",
    "container_id", "pod_uid", "container_runtime", "cgroup_kind", "enriched", "k8s_labels", "k8s_annotations",
    "cgroup_id",
)  # fmt: skip


@dataclass
class Cluster:
    api: K8sApiServer
    pods: KubePods
    sql: Any  # clickhouse_connect client over serve-sql
    agent: FleetscopeProcess
    ingest: FleetscopeProcess
    marker: str
    health_port: int  # the ingester's /metrics

    def batches_waited(self) -> float:
        """Batches the ingester held back for pods the watch was about to deliver (its own count)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/metrics", timeout=30) as r:
            text = r.read().decode()
        return metrics.parse(text)["fleetscope_ingester_k8s_batches_waited_total", frozenset()]

    def rows(self, table: str, marker: str, want: int, timeout: float = 30) -> dict[str, dict[str, Any]]:
        """Rows of `table` caused by `/bin/sh -c 'exit 0' <marker>-*`, by marker suffix."""
        cols = ", ".join("t." + c for c in COLUMNS)
        if table == "process_exec":  # the marker's exec (the pid's earlier exec is the wrapper shell)
            sql = f"SELECT t.args, {cols} FROM fleet.process_exec AS t WHERE startsWith(t.args, {{p:String}})"
        else:
            sql = (
                f"SELECT e.args, {cols} FROM fleet.{table} AS t INNER JOIN (SELECT pid, args FROM "
                "fleet.process_exec WHERE startsWith(args, {p:String})) AS e ON t.pid = e.pid"
            )
        prefix = f"/bin/sh -c exit 0 {marker}-"
        got: list[tuple[Any, ...]] = []

        def enough() -> bool:
            nonlocal got
            got = self.sql.query(sql, parameters={"p": prefix}).result_rows
            return len(got) >= want

        wait_until(enough, timeout, f"{want} {table} rows of {marker}")
        assert len(got) == want, got
        return {r[0].removeprefix(prefix): dict(zip(COLUMNS, r[1:], strict=True)) for r in got}


@pytest.fixture(scope="module")
def cluster(kafka_broker, bpf_objects, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("k8s")
    prefix = f"fsk8s{uuid.uuid4().hex[:8]}"
    with K8sApiServer() as api, kubepods() as pods, ServeSql(tmp / "store", tmp / "sql.log") as sql:
        kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
        ingest = FleetscopeProcess(
            "ingest", "--brokers", kafka_broker.bootstrap, "--clickhouse", sql.url, "--topic-prefix", prefix,
            "--group-id", prefix, "--stats-interval", "1s", "--k8s-api", "kubeconfig",
            "--k8s-kubeconfig", str(kubeconfig), "--k8s-resolve-wait", "6s",
            "--k8s-labels", "app.kubernetes.io/name,tier", "--k8s-annotations", "team.example/owner",
            "--health-listen", "127.0.0.1:0", log=tmp / "ingest.log",
        )  # fmt: skip
        agent = FleetscopeProcess(
            "agent", "--brokers", kafka_broker.bootstrap, "--topic-prefix", prefix, "--bpf-dir", str(bpf_objects),
            "--spool-dir", str(tmp / "spool"), log=tmp / "agent.log",
        )  # fmt: skip
        with ingest, agent:
            agent.wait_for_log("probe process running", 60)
            ingest.wait_for_log("kubernetes API at", 60)
            ingest.wait_for_log("consuming", 120)
            line = next(ln for ln in ingest.log_text().splitlines() if "ingester health at" in ln)
            port = int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
            client = clickhouse_connect.get_client(dsn=sql.url)
            yield Cluster(api, pods, client, agent, ingest, f"fsk8s-{uuid.uuid4().hex[:8]}", port)
            client.close()


def expect(row: dict[str, Any], c: Container, pod: dict[str, Any], kind: str, workload: str, **extra: Any) -> None:
    meta = pod["metadata"]
    assert row["k8s_namespace"] == meta["namespace"]
    assert row["k8s_pod"] == meta["name"]
    assert row["k8s_container"] == c.name
    assert (row["k8s_workload_kind"], row["k8s_workload"]) == (kind, workload)
    assert row["k8s_node"] == pod["spec"]["nodeName"]
    assert row["container_id"] == c.container_id
    assert row["pod_uid"] == c.pod_uid
    assert row["container_runtime"] == c.runtime
    assert row["cgroup_kind"] == "container"
    assert row["cgroup_id"] == c.cgroup_id
    assert row["enriched"] == 1
    for key, value in extra.items():
        assert row[key] == value, key


def test_exec_rows_carry_pod_identity(cluster: Cluster) -> None:
    """Deployment (via its ReplicaSet), StatefulSet, DaemonSet and CronJob (via its Job) pods
    under containerd, CRI-O and Docker, systemd and cgroupfs drivers; and a host process."""
    api, kp, m = cluster.api, cluster.pods, cluster.marker
    dep_uid, rs_uid, job_uid = new_uid(), new_uid(), new_uid()
    api.add(k8s_api.replicaset("web-7d4b9c", "shop", rs_uid, ("web", dep_uid)))
    api.add(k8s_api.job("report-29000000", "batch", job_uid, ("report", new_uid())))

    web_uid = new_uid()
    app = kp.container(web_uid, "app", "containerd", "systemd", "burstable")
    envoy = kp.container(web_uid, "envoy", "containerd", "systemd", "burstable")
    web = k8s_api.pod(
        "web-7d4b9c-x2x9k", "shop", web_uid, node="node-a",
        containers=[("app", app.status_id), ("envoy", envoy.status_id)],
        owner=("ReplicaSet", "web-7d4b9c", rs_uid),
        labels={"app.kubernetes.io/name": "webshop", "tier": "frontend", "pod-template-hash": "7d4b9c"},
        annotations={"team.example/owner": "payments", "other": "x"},
    )  # fmt: skip
    db_uid = new_uid()
    pg = kp.container(db_uid, "postgres", "cri-o", "cgroupfs", "guaranteed")
    db = k8s_api.pod("db-0", "shop", db_uid, node="node-b", containers=[("postgres", pg.status_id)],
                     owner=("StatefulSet", "db", new_uid()))  # fmt: skip
    ne_uid = new_uid()
    exporter = kp.container(ne_uid, "exporter", "docker", "systemd", "besteffort")
    ne = k8s_api.pod("node-exporter-4kq7z", "monitoring", ne_uid, containers=[("exporter", exporter.status_id)],
                     owner=("DaemonSet", "node-exporter", new_uid()))  # fmt: skip
    report_uid = new_uid()
    rep = kp.container(report_uid, "report", "containerd", "cgroupfs", "burstable")
    report = k8s_api.pod("report-29000000-q8v2z", "batch", report_uid, containers=[("report", rep.status_id)],
                         owner=("Job", "report-29000000", job_uid))  # fmt: skip
    for p in (web, db, ne, report):
        api.add(p)

    cases = {"app": app, "envoy": envoy, "pg": pg, "exporter": exporter, "report": rep}
    for name, c in cases.items():
        run_marker(c.cgroup, f"{m}-{name}")
    subprocess.run(["/bin/sh", "-c", "exit 0", f"{m}-host"], check=True)  # in the test's own cgroup

    for table in ("process_exec", "process_exit"):
        rows = cluster.rows(table, m, len(cases) + 1)
        labels = {"app.kubernetes.io/name": "webshop", "tier": "frontend"}
        expect(rows["app"], app, web, "Deployment", "web", k8s_labels=labels,
               k8s_annotations={"team.example/owner": "payments"})  # fmt: skip
        expect(rows["envoy"], envoy, web, "Deployment", "web", k8s_labels=labels)
        expect(rows["pg"], pg, db, "StatefulSet", "db", k8s_labels={})
        expect(rows["exporter"], exporter, ne, "DaemonSet", "node-exporter")
        # cgroupfs + containerd: the path has no runtime; the ingester takes it from the pod status
        expect(rows["report"], rep, report, "CronJob", "report")
        h = rows["host"]
        assert (h["cgroup_kind"], h["enriched"], h["container_id"], h["pod_uid"]) == ("host", 1, "", "")
        assert (h["k8s_namespace"], h["k8s_pod"], h["k8s_workload"]) == ("", "", "")


def test_pod_churn_during_a_run(cluster: Cluster) -> None:
    """A pod the API reports only after its process ran; a pod deleted before its events
    reach the ingester; a pod created while the watch expired (410), which only a new
    list can show. All three resolve."""
    api, kp, m = cluster.api, cluster.pods, f"{cluster.marker}-churn"

    # created after its process started: the ingester waits for the watch (k8s_resolve_wait)
    late_uid = new_uid()
    late_c = kp.container(late_uid, "worker", "containerd", "systemd", "besteffort")
    late = k8s_api.pod("late-6f9d8-abcde", "jobs", late_uid, containers=[("worker", late_c.status_id)])
    run_marker(late_c.cgroup, f"{m}-late")
    time.sleep(2.0)  # the batch is at the ingester by now, waiting
    api.add(late)

    # deleted before its late events arrive: the agent is stopped while the process runs and
    # the pod is deleted, so its rows reach the ingester after the DELETED event
    gone_uid = new_uid()
    gone_c = kp.container(gone_uid, "main", "cri-o", "cgroupfs", "burstable")
    gone = k8s_api.pod("gone-0", "jobs", gone_uid, containers=[("main", gone_c.status_id)],
                       owner=("StatefulSet", "gone", new_uid()))  # fmt: skip
    api.add(gone)
    assert cluster.agent.proc is not None
    cluster.agent.proc.send_signal(signal.SIGSTOP)
    try:
        run_marker(gone_c.cgroup, f"{m}-gone")
        api.delete(gone)
        time.sleep(1.0)  # the ingester applies the DELETED event
    finally:
        cluster.agent.proc.send_signal(signal.SIGCONT)

    # the watch expires (410 Gone) and the pod appears inside the compacted history
    lists_before = api.list_requests("pods")
    relisted_uid = new_uid()
    relisted_c = kp.container(relisted_uid, "api", "docker", "systemd", "guaranteed")
    relisted = k8s_api.pod("api-5c7b-zz9k2", "jobs", relisted_uid, containers=[("api", relisted_c.status_id)])
    run_marker(relisted_c.cgroup, f"{m}-relisted")
    api.expire(then=lambda s: s.add_in_expire(relisted))

    rows = cluster.rows("process_exec", m, 3)
    expect(rows["late"], late_c, late, "Pod", "late-6f9d8-abcde")
    expect(rows["gone"], gone_c, gone, "StatefulSet", "gone")
    expect(rows["relisted"], relisted_c, relisted, "Pod", "api-5c7b-zz9k2")
    assert api.list_requests("pods") > lists_before, "the 410 was not followed by a new list"
    assert "watch expired (410 Gone" in cluster.ingest.log_text()


def test_unreachable_api_writes_rows_unenriched_and_counts_them(cluster: Cluster) -> None:
    """With the API server gone, rows of pods the cache never saw are written at once with
    empty k8s fields and enriched = 0, and counted; pods it knew keep resolving."""
    api, kp, m = cluster.api, cluster.pods, f"{cluster.marker}-down"
    known_uid = new_uid()
    known_c = kp.container(known_uid, "app", "containerd", "systemd", "burstable")
    known = k8s_api.pod("known-0", "shop", known_uid, containers=[("app", known_c.status_id)])
    api.add(known)
    # the pod is in the ingester's cache once a process of its container is stored enriched (the marker's
    # prefix is not `m`'s, so it is not among the rows counted below)
    run_marker(known_c.cgroup, f"{cluster.marker}cached-known")
    expect(cluster.rows("process_exec", f"{cluster.marker}cached", 1)["known"], known_c, known, "Pod", "known-0")
    downs = cluster.ingest.log_text().count(API_DOWN)
    api.stop()
    wait_until(lambda: cluster.ingest.log_text().count(API_DOWN) > downs, 30, "the ingester noticing the API is gone")
    # the watch is down from here on: no batch may start waiting for a pod (batches count when they start)
    waited = cluster.batches_waited()

    unknown_c = kp.container(new_uid(), "app", "containerd", "systemd", "burstable")
    n = 5
    for i in range(n):
        run_marker(unknown_c.cgroup, f"{m}-unknown{i}")
    run_marker(known_c.cgroup, f"{m}-known")
    rows = cluster.rows("process_exec", m, n + 1)
    assert cluster.batches_waited() == waited, "rows of unknown pods were held back waiting for the API"
    for i in range(n):
        r = rows[f"unknown{i}"]
        assert (r["enriched"], r["k8s_namespace"], r["k8s_pod"], r["k8s_workload"]) == (0, "", "", "")
        assert (r["container_id"], r["pod_uid"], r["cgroup_kind"]) == (unknown_c.container_id, unknown_c.pod_uid,
                                                                        "container")  # fmt: skip
    expect(rows["known"], known_c, known, "Pod", "known-0")

    def counted() -> bool:
        res = cluster.sql.query(
            "SELECT sum(value) FROM fleet.pipeline_stats WHERE stage = 'ingester' AND counter = 'rows_unenriched' "
            "AND stream = 'process_exec'"
        )
        return int(res.result_rows[0][0] or 0) >= n

    wait_until(counted, 15, "rows_unenriched counted in fleet.pipeline_stats")
