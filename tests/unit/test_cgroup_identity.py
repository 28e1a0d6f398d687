"""cgroup path -> container id, pod UID, runtime; the bounded resolver; the Batcher's columns."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from fleetscope.codec import SCHEMAS, decode_batch, encode_batch
from fleetscope.v1 import batch_pb2, process_pb2
from node_agent.batcher import Batcher
from node_agent.cgroups import HOST, UNKNOWN, CgroupInfo, CgroupResolver, path_info

CID = "0123456789abcdef" * 4
UID = "8f1c5a2e-3b4d-4e6f-9a0b-1c2d3e4f5a6b"
SLICE_UID = UID.replace("-", "_")
HASH = "6b1f0b5d8e3c4a2f9e8d7c6b5a4f3e2d"  # a static pod's config hash


@pytest.mark.parametrize(
    "path, expected",
    [
        # systemd driver: containerd, CRI-O, Docker; burstable / besteffort / guaranteed
        (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SLICE_UID}.slice/cri-containerd-{CID}.scope",
         CgroupInfo(CID, UID, "containerd", "container")),
        (f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SLICE_UID}.slice/crio-{CID}.scope",
         CgroupInfo(CID, UID, "cri-o", "container")),
        (f"kubepods.slice/kubepods-pod{SLICE_UID}.slice/docker-{CID}.scope",
         CgroupInfo(CID, UID, "docker", "container")),
        # cgroupfs driver: containerd and Docker name the cgroup by the id alone, CRI-O prefixes it
        (f"kubepods/burstable/pod{UID}/{CID}", CgroupInfo(CID, UID, "", "container")),
        (f"kubepods/pod{UID}/crio-{CID}", CgroupInfo(CID, UID, "cri-o", "container")),
        # the pod's own cgroup, CRI-O's conmon beside the containers
        (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SLICE_UID}.slice",
         CgroupInfo("", UID, "", "pod")),
        (f"kubepods.slice/kubepods-pod{SLICE_UID}.slice/crio-conmon-{CID}.scope", CgroupInfo("", UID, "", "pod")),
        # a nested kubelet (kind), a static pod's config hash, a cgroup inside the container
        (f"kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
         f"kubelet-kubepods-besteffort-pod{HASH}.slice/cri-containerd-{CID}.scope/init.scope",
         CgroupInfo(CID, HASH, "containerd", "container")),
        # containers outside Kubernetes, and the host
        (f"system.slice/docker-{CID}.scope", CgroupInfo(CID, "", "docker", "container")),
        (f"docker/{CID}", CgroupInfo(CID, "", "docker", "container")),
        (f"machine.slice/libpod-{CID}.scope", CgroupInfo(CID, "", "podman", "container")),
        ("user.slice/user-1000.slice/session-3.scope", HOST),
        ("", HOST),
        ("kubepods.slice/kubepods-burstable.slice", HOST),
    ],
)  # fmt: skip
def test_kubelet_and_runtime_layouts(path: str, expected: CgroupInfo) -> None:
    assert path_info(path) == expected


def tree(root: Path, *paths: str) -> dict[str, int]:
    """Directories under root (any filesystem: the walk only needs inode numbers)."""
    for p in paths:
        (root / p).mkdir(parents=True, exist_ok=True)
    return {p: os.stat(root / p).st_ino for p in paths}


def test_resolver_maps_inodes_and_keeps_vanished_cgroups(tmp_path: Path) -> None:
    pod = f"kubepods/burstable/pod{UID}"
    ids = tree(tmp_path, pod, f"{pod}/{CID}")
    r = CgroupResolver(tmp_path, min_rewalk=0)
    r.observe(np.array([ids[pod]], np.uint64))  # the first lookup walks
    # a container created after the first walk is found by walking again on the miss
    new = f"{pod}/{'f' * 64}"
    ids |= tree(tmp_path, new)
    time.sleep(0.05)  # walks are at least 10 walk durations apart
    r.observe(np.array([ids[new], ids[f"{pod}/{CID}"]], np.uint64))
    assert r.stats.walks == 2
    # gone before its batch is cut: still resolved from the cache of seen ids
    (tmp_path / new).rmdir()
    cols = r.columns(np.array([ids[new], ids[new], ids[pod], 999_999_999], np.uint64))
    assert rows(cols["container_id"]) == ["f" * 64, "f" * 64, "", ""]
    assert rows(cols["cgroup_kind"]) == ["container", "container", "pod", ""]
    assert len(cols["cgroup_kind"][1]) == 3  # the dictionary holds each value once
    assert r.stats.unresolved_ids == 1


def rows(column: tuple[bytes, np.ndarray, np.ndarray]) -> list[str]:
    data, offsets, index = column
    ends = offsets.tolist()
    values = [data[a:b].decode() for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    return [values[i] for i in index]


def test_resolver_cache_is_bounded_and_walks_are_rate_limited(tmp_path: Path) -> None:
    ids = tree(tmp_path, *[f"kubepods/pod{UID[:-2]}{i:02d}/{CID}" for i in range(10)])
    r = CgroupResolver(tmp_path, max_entries=4, min_rewalk=3600)
    r.observe(np.array(list(ids.values()), np.uint64))
    assert len(r._seen) == 4
    late = tree(tmp_path, "late")["late"]
    infos, _ = r.resolve(np.array([late], np.uint64))
    assert infos == [UNKNOWN] and r.stats.walks == 1  # no walk before min_rewalk


def exec_records(cgroup_ids: list[int]) -> np.ndarray:
    rec = np.zeros(len(cgroup_ids), [("cgroup_id", "<u8"), ("pid", "<u4")])
    rec["cgroup_id"] = cgroup_ids
    rec["pid"] = np.arange(len(cgroup_ids))
    return rec


def exec_builder(rec: Mapping[str, np.ndarray], offset: int) -> dict[str, np.ndarray]:
    n = len(rec["pid"])
    return {
        "time": np.zeros(n, np.uint64), "pid": rec["pid"], "ppid": np.zeros(n, np.uint32),
        "uid": np.zeros(n, np.uint32), "cgroup_id": rec["cgroup_id"], "comm": np.array([b"sh"] * n, "S16"),
        "filename": np.array([b"/bin/sh"] * n, "S16"), "args": np.array([b"sh"] * n, "S16"),
        "argc": np.ones(n, np.uint32), "args_truncated": np.zeros(n, np.uint32),
    }  # fmt: skip


def test_batcher_adds_identity_columns_to_streams_that_declare_them(tmp_path: Path) -> None:
    pod = f"kubepods.slice/kubepods-pod{SLICE_UID}.slice"
    ids = tree(tmp_path, pod, f"{pod}/cri-containerd-{CID}.scope")
    node = batch_pb2.NodeIdentity(host_name="n", machine_id="m")
    b = Batcher(node, {"process_exec": exec_builder}, 100, 1 << 20, 60, CgroupResolver(tmp_path))
    cids = [ids[f"{pod}/cri-containerd-{CID}.scope"], ids[pod], os.stat(tmp_path).st_ino, 12345]
    (batch,) = b.add("process_exec", exec_records(cids * 3)) + b.flush()
    out = decode_batch(SCHEMAS["process_exec"], batch.payload)
    assert out.columns["container_id"].decoded().tolist() == [CID, "", "", ""] * 3
    assert out.columns["pod_uid"].decoded().tolist() == [UID, UID, "", ""] * 3
    assert out.columns["container_runtime"].decoded().tolist() == ["containerd", "", "", ""] * 3
    assert out.columns["cgroup_kind"].decoded().tolist() == ["container", "pod", "host", ""] * 3
    msg = process_pb2.ProcessExecBatch.FromString(batch.payload)  # the library reads the same
    assert len(msg.container_id.offsets) == 2 and len(msg.container_id.index) == 12


def test_identity_columns_are_omittable_for_older_writers() -> None:
    """A batch from an agent before the identity columns (schema minor 0) decodes with ""."""
    h = batch_pb2.BatchHeader(stream="process_exit", batch_id="b", row_count=2, schema_minor=0)
    cols = {
        "time": np.zeros(2, np.uint64), "pid": np.ones(2, np.uint32), "ppid": np.ones(2, np.uint32),
        "cgroup_id": np.ones(2, np.uint64), "comm": np.array([b"a", b"b"]), "exit_code": np.zeros(2, np.int32),
        "signal": np.zeros(2, np.uint32), "duration_ns": np.zeros(2, np.uint64),
    }  # fmt: skip
    out = decode_batch(SCHEMAS["process_exit"], encode_batch(SCHEMAS["process_exit"], h, cols))
    assert out.columns["pod_uid"].decoded().tolist() == ["", ""]
    assert [c.name for c in SCHEMAS["block_io_latency"].columns if c.omittable] == []


def test_identity_columns_empty_in_every_row_are_left_out() -> None:
    """Identity columns that are "" in every row (here: no cgroup resolver) are not sent at
    all; they are omittable, so readers fill in "" (a host without containers sends no
    container ids)."""
    node = batch_pb2.NodeIdentity(host_name="n", machine_id="m")
    b = Batcher(node, {"process_exec": exec_builder}, 100, 1 << 20, 60)  # no resolver: every identity is ""
    (batch,) = b.add("process_exec", exec_records([1, 2, 3])) + b.flush()
    msg = process_pb2.ProcessExecBatch.FromString(batch.payload)
    assert not any(msg.HasField(name) for name in ("container_id", "pod_uid", "container_runtime", "cgroup_kind"))
    out = decode_batch(SCHEMAS["process_exec"], batch.payload)
    assert out.columns["container_id"].decoded().tolist() == [""] * 3
    assert out.columns["cgroup_kind"].decoded().tolist() == [""] * 3
