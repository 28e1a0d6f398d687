"""TCP spans with pod identity, end to end: two processes in kubelet-shaped container cgroups
(tests/support/kubepods.py) talk over loopback; `fleetscope run --probes
process,tcp_connections --k8s-api kubeconfig` resolves both ends' pods through the test API
server (tests/support/k8s_api.py, the real client library) and exports one CLIENT and one
SERVER span per connection over OTLP to the test receiver, each with its pod's `k8s.*`,
`container.id`, `host.name` and `service.name` resource attributes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_otel_spans import FAST_EXPORT, assert_connection, connection_spans
from tests.integration.test_tcp_connections import Exchange, running_server
from tests.support import k8s_api
from tests.support.k8s_api import K8sApiServer, new_uid
from tests.support.kubepods import Container, kubepods
from tests.support.otlp_receiver import otlp_receiver
from tests.support.procs import FleetscopeProcess

pytestmark = [pytest.mark.root, pytest.mark.integration]

N = 12
REPO = Path(__file__).resolve().parents[2]
CLIENT = (
    "import dataclasses, json, sys\n"
    "from tests.integration.test_tcp_connections import run_exchanges\n"
    "exchanges = [dataclasses.asdict(e) for e in run_exchanges(*map(int, sys.argv[1:]))]\n"
    "print(json.dumps([open('/proc/self/comm').read().strip(), exchanges]))\n"
)


def run_client(cgroup: Path, n: int, v4: int, v6: int) -> tuple[int, str, list[Exchange]]:
    """The client process, moved into `cgroup` before it execs: n connections; (pid, comm, exchanges)."""
    cmd = ["/bin/sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", sys.executable, "-c", CLIENT]
    with subprocess.Popen([*cmd, str(n), str(v4), str(v6)], stdout=subprocess.PIPE, text=True, cwd=REPO) as proc:
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        comm, exchanges = json.loads(out)
        return proc.pid, comm, [Exchange(**e) for e in exchanges]


def deployment_pod(api: K8sApiServer, c: Container, name: str, ns: str, node: str, **labels: str) -> dict[str, object]:
    """A pod of Deployment `name` through its ReplicaSet (both served by the API), running c."""
    rs, rs_uid = f"{name}-5f7c9d", new_uid()
    api.add(k8s_api.replicaset(rs, ns, rs_uid, (name, new_uid())))
    pod = k8s_api.pod(f"{rs}-{c.pod_uid[:5]}", ns, c.pod_uid, node=node, containers=[(c.name, c.status_id)],
                      owner=("ReplicaSet", rs, rs_uid), labels={"pod-template-hash": "5f7c9d", **labels})  # fmt: skip
    api.add(pod)
    return pod


def expected_resource(pod: dict[str, object], c: Container, deployment: str, service: str) -> dict[str, str]:
    meta, spec = pod["metadata"], pod["spec"]
    assert isinstance(meta, dict) and isinstance(spec, dict)
    return {
        "service.name": service,
        "host.name": "otel-node",
        "k8s.node.name": spec["nodeName"],
        "k8s.namespace.name": meta["namespace"],
        "k8s.pod.name": meta["name"],
        "k8s.pod.uid": c.pod_uid,
        "k8s.container.name": c.name,
        "k8s.deployment.name": deployment,
        "container.id": c.container_id,
    }


def test_tcp_spans_carry_both_pods_identity(bpf_objects, tmp_path: Path) -> None:
    with K8sApiServer() as api, kubepods() as kp, otlp_receiver() as receiver:
        client_c = kp.container(new_uid(), "checkout", "containerd", "systemd", "burstable")
        server_c = kp.container(new_uid(), "inventory", "cri-o", "cgroupfs", "guaranteed")
        # service.name: the app.kubernetes.io/name label on the client's pod, the workload on the server's
        client_pod = deployment_pod(api, client_c, "checkout", "shop", "node-a", **{"app.kubernetes.io/name": "store"})
        server_pod = deployment_pod(api, server_c, "inventory", "stock", "node-a", tier="backend")
        # --filter-cgroup: other activity on the machine would crowd the SDK's bounded OTLP queue
        run = FleetscopeProcess(
            "run", "--probes", "process,tcp_connections", "--data-dir", str(tmp_path / "store"),
            "--bpf-dir", str(bpf_objects), "--status", "log", "--sql-listen", "off", "--node-name", "otel-node",
            "--batch-max-age", "200ms", "--otlp-protocol", "http/protobuf", "--k8s-api", "kubeconfig",
            "--k8s-kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig")), "--filter-cgroup", str(kp.root),
            log=tmp_path / "run.log", env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, **FAST_EXPORT},
        )  # fmt: skip
        with run:
            run.wait_for_log("kubernetes API at", 60)
            run.wait_for_log("probe tcp_connections running", 120)
            with running_server(N, server_c.cgroup) as (server, v4, v6):
                client_pid, client_comm, exchanges = run_client(client_c.cgroup, N, v4, v6)
            receiver.wait_for(lambda s: len(connection_spans(s, {v4, v6})) >= 2 * N, 30)
            run.stop()
        assert run.returncode == 0, run.log_text()[-3000:]
        spans = connection_spans(list(receiver.spans), {v4, v6})  # everything, after the final flush

    clients = {s.attributes["client.port"]: s for s in spans if s.kind == "client"}
    servers = {s.attributes["client.port"]: s for s in spans if s.kind == "server"}
    assert len(spans) == 2 * N and len(clients) == len(servers) == N
    assert {e.client_port for e in exchanges} == set(clients) == set(servers)
    want_client = expected_resource(client_pod, client_c, "checkout", "store")
    want_server = expected_resource(server_pod, server_c, "inventory", "inventory")
    for ex in exchanges:
        client, srv = clients[ex.client_port], servers[ex.client_port]
        assert_connection(client, srv, ex, client_pid, client_comm, server.pid)
        assert client.resource == want_client and srv.resource == want_server
