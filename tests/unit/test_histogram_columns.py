"""Histogram streams without a kernel: fixed-length array columns (`per_row`) through the
fast codec and the protobuf library both ways, the column builders, syscall and device
names, and the row layout."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fleetscope.codec import SCHEMAS, BatchDecodeError, decode_batch, encode_batch
from fleetscope.config import AgentOptions, ConfigError
from fleetscope.v1 import batch_pb2, runqueue_latency_pb2, syscall_latency_pb2
from node_agent.histogram import row_dtype
from node_agent.probes import get_probe
from node_agent.probes.block_io_latency import device_names
from node_agent.syscall_names import syscall_names

rng = np.random.default_rng(11)
SYSCALL_KEY = np.dtype([("cgroup_id", "<u8"), ("nr", "<u4"), ("pad", "<u4")])


def header(stream: str, rows: int) -> batch_pb2.BatchHeader:
    return batch_pb2.BatchHeader(stream=stream, batch_id=f"m-{stream}-1-1", epoch=1, sequence=1, row_count=rows)


def syscall_rows(n: int) -> np.ndarray:
    rows = np.zeros(n, row_dtype(SYSCALL_KEY, 32))
    rows["cgroup_id"] = rng.integers(1, 2**40, n, dtype=np.uint64)
    rows["nr"] = rng.choice([0, 1, 110, 230, 999], n).astype(np.uint32)
    rows["buckets"] = rng.integers(0, 1000, (n, 32), dtype=np.uint64)
    rows["count"] = rows["buckets"].sum(axis=1)
    rows["sum_ns"] = rng.integers(0, 2**40, n, dtype=np.uint64)
    rows["time_ns"], rows["interval_ns"] = 5_000_000_000, 10_000_000_000
    return rows


def test_per_row_comes_from_the_proto_option() -> None:
    for stream in ("syscall_latency", "block_io_latency", "runqueue_latency"):
        per_row = {c.name: c.per_row for c in SCHEMAS[stream].columns}
        assert per_row["buckets"] == 32
        assert {n for n, k in per_row.items() if k != 1} == {"buckets"}
    assert all(c.per_row == 1 for c in SCHEMAS["process_exec"].columns)


@pytest.mark.parametrize("n", [0, 1, 300])
def test_array_column_encodes_flat_and_decodes_2d(n: int) -> None:
    probe = get_probe("syscall_latency")
    rows = syscall_rows(n)
    cols = probe.histograms[0].columns(rows, 1_000)
    wire = encode_batch(SCHEMAS["syscall_latency"], header("syscall_latency", n), cols)
    msg = syscall_latency_pb2.SyscallLatencyBatch.FromString(wire)  # the library agrees
    assert list(msg.buckets) == rows["buckets"].ravel().tolist()
    assert list(msg.time) == [5_000_001_000] * n and list(msg.interval_s) == [10.0] * n
    back = decode_batch(SCHEMAS["syscall_latency"], wire)
    assert back.columns["buckets"].shape == (n, 32)
    assert (back.columns["buckets"] == rows["buckets"]).all()
    assert (back.columns["count"] == back.columns["buckets"].sum(axis=1)).all()


def test_protobuf_built_array_column_decodes() -> None:
    msg = runqueue_latency_pb2.RunqueueLatencyBatch(header=header("runqueue_latency", 2))
    msg.time.extend([1, 2])
    msg.interval_s.extend([1.0, 1.0])
    msg.cgroup_id.extend([7, 8])
    msg.count.extend([3, 4])
    msg.sum_ns.extend([30, 40])
    msg.buckets.extend(range(64))
    back = decode_batch(SCHEMAS["runqueue_latency"], msg.SerializeToString())
    assert back.columns["buckets"].tolist() == [list(range(32)), list(range(32, 64))]
    del msg.buckets[-1]
    with pytest.raises(BatchDecodeError, match=r"buckets \(32 per row\): 63 values for 64"):
        decode_batch(SCHEMAS["runqueue_latency"], msg.SerializeToString())


def test_encoder_refuses_an_array_column_of_another_width() -> None:
    cols = (
        get_probe("runqueue_latency")
        .histograms[0]
        .columns(np.zeros(2, row_dtype(np.dtype([("cgroup_id", "<u8")]), 32)), 0)
    )
    cols["buckets"] = np.zeros((2, 31), np.uint64)
    with pytest.raises(ValueError, match="buckets: 62 values, not 32 per row"):
        encode_batch(SCHEMAS["runqueue_latency"], header("runqueue_latency", 2), cols)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 syscall numbers")
def test_syscall_names_come_from_libseccomp_with_a_numeric_fallback() -> None:
    names = syscall_names(np.array([0, 1, 110, 230, 439, 999, 999], np.uint32))
    assert names.tolist() == [
        b"read", b"write", b"getppid", b"clock_nanosleep", b"faccessat2", b"syscall_999", b"syscall_999"
    ]  # fmt: skip
    assert syscall_names(np.zeros(0, np.uint32)).shape == (0,)


def test_block_columns_name_devices_and_operations() -> None:
    rows = np.zeros(3, row_dtype(np.dtype([("dev", "<u4"), ("op", "<u4")]), 32))
    rows["dev"] = [(4095 << 20) | 7, (4095 << 20) | 7, 1 << 20]  # 4095:7 exists nowhere
    rows["op"] = [0, 3, 9]
    cols = get_probe("block_io_latency").histograms[0].columns(rows, 0)
    assert cols["dev_major"].tolist() == [4095, 4095, 1] and cols["dev_minor"].tolist() == [7, 7, 0]
    assert cols["device"][0] == b"4095:7"
    assert cols["operation"].tolist() == [b"read", b"flush", b"other"]  # unknown ops are "other"
    assert device_names(np.zeros(0, np.uint32), np.zeros(0, np.uint32)).shape == (0,)


def test_row_layout_refuses_clashing_key_fields() -> None:
    dt = row_dtype(SYSCALL_KEY, 32)
    assert dt.names == ("cgroup_id", "nr", "pad", "time_ns", "interval_ns", "count", "sum_ns", "buckets")
    assert dt["buckets"].shape == (32,)
    with pytest.raises(ValueError, match="clash"):
        row_dtype(np.dtype([("count", "<u8")]), 32)


def test_histogram_interval_has_a_floor() -> None:
    AgentOptions(histogram_interval=0.1).validate()
    with pytest.raises(ConfigError, match=r"histogram_interval: 0\.01s is too short"):
        AgentOptions(histogram_interval=0.01).validate()
