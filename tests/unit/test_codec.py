"""The fast columnar codec and the official protobuf library agree, both ways."""

from __future__ import annotations

import numpy as np
import pytest

from fleetscope import codec
from fleetscope.codec import SCHEMA_MINOR, SCHEMAS, BatchDecodeError, decode_batch, encode_batch
from fleetscope.v1 import batch_pb2, process_pb2

rng = np.random.default_rng(7)


def header(stream: str, rows: int) -> batch_pb2.BatchHeader:
    h = batch_pb2.BatchHeader(stream=stream, batch_id=f"m-{stream}-1-1", epoch=1, sequence=1, row_count=rows)
    h.node.host_name = "node-a"
    return h


def exec_columns(n: int) -> dict[str, np.ndarray]:
    names = np.array([b"sh", b"python3", b"", b"x" * 16][: max(1, min(n, 4))] * n, dtype="S16")[:n]
    return {
        "time": rng.integers(0, 2**63, n, dtype=np.uint64),
        "pid": rng.integers(0, 2**32, n, dtype=np.uint32),
        "ppid": rng.integers(0, 2**32, n, dtype=np.uint32),
        "uid": np.zeros(n, np.uint32),
        "cgroup_id": rng.integers(0, 2**64 - 1, n, dtype=np.uint64),
        "comm": names,
        "filename": np.array([f"/usr/bin/p{i % 7}".encode() for i in range(n)], dtype="S256"),
        "args": np.array([f"p --n {i} ünï".encode() for i in range(n)], dtype="S1024"),
        "argc": np.full(n, 3, np.uint32),
        "args_truncated": np.zeros(n, np.uint32),
    }


@pytest.mark.parametrize("n", [0, 1, 5, 1000])
def test_fast_encoder_bytes_parse_with_protobuf(n: int) -> None:
    cols = exec_columns(n)
    wire = encode_batch(SCHEMAS["process_exec"], header("process_exec", n), cols)
    msg = process_pb2.ProcessExecBatch.FromString(wire)
    assert msg.header.row_count == n and msg.header.node.host_name == "node-a"
    assert list(msg.pid) == cols["pid"].tolist()
    assert list(msg.time) == cols["time"].tolist()
    assert list(msg.cgroup_id) == cols["cgroup_id"].tolist()
    for name in ("comm", "filename", "args"):
        sc = getattr(msg, name)
        ends = list(sc.offsets)
        values = [sc.data[a:b] for a, b in zip([0, *ends], ends, strict=False)]
        assert [values[i] for i in sc.index] == cols[name].tolist()
    assert len(set(msg.comm.index)) == len(msg.comm.offsets)  # dictionary holds distinct values


@pytest.mark.parametrize("n", [0, 1, 777])
def test_protobuf_bytes_decode_with_fast_decoder(n: int) -> None:
    msg = process_pb2.ProcessExitBatch(header=header("process_exit", n))
    codes = rng.integers(-(2**31), 2**31, n, dtype=np.int32)
    msg.exit_code.extend(codes.tolist())
    msg.pid.extend(range(n))
    msg.ppid.extend([1] * n)
    msg.cgroup_id.extend([2**64 - 1] * n)
    msg.signal.extend([9] * n)
    msg.duration_ns.extend(range(0, 3 * n, 3))
    msg.time.extend(range(n))
    msg.comm.data = b"abcdef"
    msg.comm.offsets.extend([3, 6])
    msg.comm.index.extend([i % 2 for i in range(n)])
    out = decode_batch(SCHEMAS["process_exit"], msg.SerializeToString())
    assert out.columns["exit_code"].tolist() == codes.tolist()
    assert out.columns["cgroup_id"].tolist() == [2**64 - 1] * n
    assert out.columns["duration_ns"].tolist() == list(range(0, 3 * n, 3))
    assert out.columns["comm"].decoded().tolist() == ["abc", "def"] * (n // 2) + ["abc"] * (n % 2)


def test_unknown_fields_from_a_newer_minor_are_skipped() -> None:
    msg = process_pb2.ProcessExitBatch(header=header("process_exit", 2))
    for f in ("time", "pid", "ppid", "cgroup_id", "signal", "duration_ns", "exit_code"):
        getattr(msg, f).extend([1, 2])
    msg.comm.data = b"a"
    msg.comm.offsets.append(1)
    msg.comm.index.extend([0, 0])
    wire = msg.SerializeToString()
    # field 99 varint, field 100 length-delimited, field 101 fixed64, field 102 fixed32
    extra = bytes([0x98, 0x06, 0x05]) + bytes([0xA2, 0x06, 0x02, 0x41, 0x42])
    extra += bytes([0xA9, 0x06]) + b"\0" * 8 + bytes([0xB5, 0x06]) + b"\0" * 4
    out = decode_batch(SCHEMAS["process_exit"], wire + extra)
    assert out.columns["pid"].tolist() == [1, 2]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda w: w[:-3], "declares"),
        (lambda w: b"\x0a\xff\xff\xff\x7f" + w, "declares"),
        (lambda w: w + b"\x80", "varint"),
    ],
)
def test_malformed_input_raises_decode_error(mutate, reason: str) -> None:
    wire = encode_batch(SCHEMAS["process_exec"], header("process_exec", 10), exec_columns(10))
    with pytest.raises(BatchDecodeError, match=reason):
        decode_batch(SCHEMAS["process_exec"], mutate(wire))


def test_absurd_dictionary_index_is_rejected() -> None:
    msg = process_pb2.ProcessExitBatch(header=header("process_exit", 1))
    for f in ("time", "pid", "ppid", "cgroup_id", "signal", "duration_ns", "exit_code"):
        getattr(msg, f).append(0)
    msg.comm.data = b"a"
    msg.comm.offsets.append(1)
    msg.comm.index.append(4_000_000_000)
    with pytest.raises(BatchDecodeError, match="outside a dictionary"):
        decode_batch(SCHEMAS["process_exit"], msg.SerializeToString())


def test_schema_columns_come_from_the_proto() -> None:
    cols = {c.name: c for c in SCHEMAS["process_exit"].columns}
    assert cols["exit_code"].dtype == np.dtype("<i4") and cols["comm"].dtype is None
    assert codec.SCHEMAS["process_exec"].topic_suffix == "process_exec.v1"


# --- schema evolution within v1 ---------------------------------------------------------------


def _evolved_exit_schema() -> codec.StreamSchema:
    """ProcessExitBatch as a later minor (3) would define it: a numeric column (150, fixed64,
    2 per row) and a string column (151) added with since_minor = 3, built as a real
    protobuf descriptor so the codec reads the options as it reads batch.proto's."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="fleetscope_test/evolved_exit.proto", package="fleetscope_test",
                                             syntax="proto3", dependency=["fleetscope/v1/batch.proto"])  # fmt: skip
    process_pb2.ProcessExitBatch.DESCRIPTOR.CopyToProto(msg := fdp.message_type.add())
    added = msg.field.add(name="weight", number=150, label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
                          type=descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64)  # fmt: skip
    added.options.Extensions[batch_pb2.per_row] = 2
    added.options.Extensions[batch_pb2.since_minor] = 3
    label = msg.field.add(name="label", number=151, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                          type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                          type_name=".fleetscope.v1.StringColumn")  # fmt: skip
    label.options.Extensions[batch_pb2.since_minor] = 3
    pool = descriptor_pool.Default()  # batch.proto's options live there
    try:
        desc = pool.FindMessageTypeByName("fleetscope_test.ProcessExitBatch")
    except KeyError:  # first use in this process
        pool.Add(fdp)
        desc = pool.FindMessageTypeByName("fleetscope_test.ProcessExitBatch")
    return codec._schema_from_descriptor("process_exit", message_factory.GetMessageClass(desc))


def exit_columns(n: int, minor: int = SCHEMA_MINOR) -> dict[str, np.ndarray]:
    """process_exit columns as a writer at `minor` has them (the joined oom_/signal_ ones from 2)."""
    cols = {
        "time": np.arange(n, dtype=np.uint64), "pid": np.arange(n, dtype=np.uint32) + 100,
        "ppid": np.ones(n, np.uint32), "cgroup_id": np.full(n, 7, np.uint64),
        "comm": np.array([b"sh", b"ls"] * n, dtype="S16")[:n], "exit_code": np.arange(n, dtype=np.int32),
        "signal": np.zeros(n, np.uint32), "duration_ns": np.full(n, 5, np.uint64),
    }  # fmt: skip
    for c in SCHEMAS["process_exit"].columns:
        if 0 < c.since_minor <= minor:
            cols[c.name] = np.full(n, 1, c.dtype) if c.dtype is not None else np.array([b"kill"] * n, "S16")
    return cols


def test_since_minor_is_read_from_the_field_options() -> None:
    cols = {c.name: c for c in _evolved_exit_schema().columns}
    assert (cols["weight"].since_minor, cols["weight"].per_row, cols["label"].since_minor) == (3, 2, 3)
    assert cols["pid"].since_minor == 0 and not cols["weight"].omittable


def test_batch_from_a_newer_minor_decodes_its_known_columns() -> None:
    """A writer at minor 3 adds columns this reader (minor 2) does not know: skipped."""
    newer = _evolved_exit_schema()
    h = header("process_exit", 4)
    h.schema_minor = 3
    cols = {**exit_columns(4), "weight": np.arange(8, dtype=np.uint64),
            "label": np.array([b"x", b"y", b"x", b"z"], dtype="S4")}  # fmt: skip
    out = decode_batch(SCHEMAS["process_exit"], encode_batch(newer, h, cols))
    assert out.columns["pid"].tolist() == [100, 101, 102, 103]
    assert out.columns["comm"].decoded().tolist() == ["sh", "ls", "sh", "ls"]
    assert "weight" not in out.columns and out.header.schema_minor == 3


def test_batch_from_the_previous_minor_gets_defaults_for_later_columns() -> None:
    """A reader at minor 3 reads a minor-2 batch (without the minor-3 columns): zeros and ""."""
    newer = _evolved_exit_schema()
    h = header("process_exit", 3)
    h.schema_minor = 2
    out = decode_batch(newer, encode_batch(SCHEMAS["process_exit"], h, exit_columns(3)))
    assert out.columns["weight"].shape == (3, 2) and not out.columns["weight"].any()
    assert out.columns["label"].decoded().tolist() == ["", "", ""]
    assert out.columns["exit_code"].tolist() == [0, 1, 2]


def test_a_batch_of_the_columns_minor_that_lacks_it_is_truncated() -> None:
    newer = _evolved_exit_schema()
    h = header("process_exit", 3)
    h.schema_minor = 3  # says it was written with the column, yet it is not there
    wire = encode_batch(SCHEMAS["process_exit"], h, exit_columns(3))
    with pytest.raises(BatchDecodeError, match="weight"):
        decode_batch(newer, wire)
    short = {**exit_columns(3), "weight": np.arange(5, dtype=np.uint64), "label": np.array([b"a"] * 3, "S1")}
    with pytest.raises(ValueError, match="weight"):  # the encoder refuses too
        encode_batch(newer, h, short)


def test_minor_1_exit_batch_without_the_joined_columns_decodes() -> None:
    """An agent of minor 1 writes process_exit without the oom_/signal_ columns of minor 2:
    read as zeros and "" (no OOM kill, no sender)."""
    h = header("process_exit", 2)
    h.schema_minor = 1
    out = decode_batch(SCHEMAS["process_exit"], encode_batch(SCHEMAS["process_exit"], h, exit_columns(2, minor=1)))
    assert out.columns["oom_killed"].tolist() == [0, 0] and out.columns["signal_delay_ns"].tolist() == [0, 0]
    assert out.columns["signal_sender_comm"].decoded().tolist() == ["", ""]
    full = decode_batch(SCHEMAS["process_exit"], encode_batch(SCHEMAS["process_exit"], header("process_exit", 2),
                                                              exit_columns(2)))  # fmt: skip
    assert full.columns["oom_killed"].tolist() == [1, 1]


def test_version_1_0_batch_without_identity_columns_decodes() -> None:
    """The identity columns came with minor 1 (omittable): a minor-0 batch has none."""
    h = header("process_exec", 2)
    h.schema_minor = 0
    cols = exec_columns(2)
    out = decode_batch(SCHEMAS["process_exec"], encode_batch(SCHEMAS["process_exec"], h, cols))
    assert out.columns["container_id"].decoded().tolist() == ["", ""]
    assert out.columns["pid"].tolist() == cols["pid"].tolist()


def test_present_but_short_columns_are_rejected_whatever_the_minor() -> None:
    h = header("process_exit", 3)
    h.schema_minor = 0
    msg = process_pb2.ProcessExitBatch.FromString(encode_batch(SCHEMAS["process_exit"], h, exit_columns(3)))
    del msg.pid[-1]
    with pytest.raises(BatchDecodeError, match="pid: 2 values for 3 rows"):
        decode_batch(SCHEMAS["process_exit"], msg.SerializeToString())


def test_header_strings_are_bounded() -> None:
    h = header("process_exit", 1)
    h.node.host_name = "n" * 5000
    with pytest.raises(BatchDecodeError, match="host_name of 5000 characters"):
        decode_batch(SCHEMAS["process_exit"], encode_batch(SCHEMAS["process_exit"], h, exit_columns(1)))
