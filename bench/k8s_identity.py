"""Cost of the workload identity: the agent's columns per batch, a walk of a kubelet-sized
cgroup tree, and the ingester's per-batch enrichment. Writes bench/results/k8s_identity.txt.

    .venv/bin/python bench/k8s_identity.py
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from fleetscope.codec import SCHEMAS, decode_batch, encode_batch
from fleetscope.config import IngestSettings
from fleetscope.v1 import batch_pb2
from ingester.enrich import Enricher
from ingester.enrich.pods import OwnerRecord, OwnerRef, PodRecord
from node_agent.cgroups import CgroupResolver, walk

ROWS, PODS, CONTAINERS = 16384, 200, 2  # a batch; pods on a busy node, containers each
OUT = Path(__file__).resolve().parent / "results" / "k8s_identity.txt"


def best(fn: object, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    lines = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ids = []
        uids = [str(uuid.uuid4()) for _ in range(PODS)]
        for uid in uids:
            pod = (
                root
                / "kubepods.slice/kubepods-burstable.slice"
                / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
            )
            for _ in range(CONTAINERS):
                c = pod / f"cri-containerd-{uuid.uuid4().hex}{uuid.uuid4().hex}.scope"
                c.mkdir(parents=True)
                ids.append(c.stat().st_ino)
        for i in range(2000):  # system.slice and user units
            (root / "system.slice" / f"unit-{i}.service").mkdir(parents=True)
        dirs = len(walk(root))
        t_walk = best(lambda: walk(root), 5)
        lines.append(f"walk of {dirs} cgroup directories: {t_walk * 1e3:.1f} ms")

        r = CgroupResolver(root)
        rng = np.random.default_rng(1)
        for distinct in (10, len(ids)):
            cg = rng.choice(np.array(ids[:distinct], np.uint64), ROWS)
            t = best(lambda cg=cg: r.columns(cg))
            lines.append(
                f"agent identity columns, {ROWS} rows, {distinct} distinct cgroups: {t * 1e3:.2f} ms "
                f"({t / ROWS * 1e9:.0f} ns/row)"
            )

        e = Enricher(IngestSettings(k8s_api="kubeconfig"))
        e.cache.upsert_owner("rs", OwnerRecord("ReplicaSet", "web-5d8f", OwnerRef("Deployment", "web", "d")))
        cols = r.columns(rng.choice(np.array(ids, np.uint64), ROWS))
        for uid in uids:
            e.cache.upsert(PodRecord(uid, "shop", f"web-{uid[:5]}", node="n1", labels={"app": "web", "tier": "fe"},
                                     owner=OwnerRef("ReplicaSet", "web-5d8f", "rs")))  # fmt: skip
        h = batch_pb2.BatchHeader(stream="process_exit", batch_id="b", row_count=ROWS, created_ns=time.time_ns())
        base = {
            "time": np.zeros(ROWS, np.uint64), "pid": np.zeros(ROWS, np.uint32), "ppid": np.zeros(ROWS, np.uint32),
            "cgroup_id": np.zeros(ROWS, np.uint64), "comm": np.array([b"sh"] * ROWS),
            "exit_code": np.zeros(ROWS, np.int32), "signal": np.zeros(ROWS, np.uint32),
            "duration_ns": np.zeros(ROWS, np.uint64),
        }  # fmt: skip
        batch = decode_batch(SCHEMAS["process_exit"], encode_batch(SCHEMAS["process_exit"], h, {**base, **cols}))
        t = best(lambda: e.lookup(batch))
        out = e.lookup(batch)
        assert out is not None
        lines.append(
            f"ingester enrichment, {ROWS} rows, {len(out.identities)} distinct identities: {t * 1e3:.2f} ms "
            f"({t / ROWS * 1e9:.0f} ns/row)"
        )
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
