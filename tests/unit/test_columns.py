"""Ring-buffer records become batch columns with C-string semantics, vectorised."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from node_agent.columns import argv_strings, c_strings


def test_c_strings_stop_at_the_first_nul() -> None:
    # reserved ring-buffer records are not zeroed: leftovers after the NUL must not leak
    raw = np.array([b"sh\0leftover", b"python3", b"\0junk", b"x" * 16], dtype="S16")
    assert c_strings(raw).tolist() == [b"sh", b"python3", b"", b"x" * 16]


def test_argv_is_joined_by_spaces_within_its_length() -> None:
    args = np.array([b"/bin/sh\0-c\0exit 3\0old tail", b"a\0\0b\0", b"cut-off-arg"], dtype="S32")
    lengths = np.array([18, 5, 7], dtype=np.uint32)
    # an empty argument stays visible as two spaces; a cut-off last argument keeps its bytes
    assert argv_strings(args, lengths).tolist() == [b"/bin/sh -c exit 3", b"a  b", b"cut-off"]


def test_batches_respect_the_byte_bound_and_learn_the_encoded_size() -> None:
    from fleetscope.codec import SCHEMAS, decode_batch
    from node_agent.batcher import Batcher, node_identity
    from node_agent.probes.process import exit_columns

    dtype = np.dtype([("time_ns", "<u8"), ("cgroup_id", "<u8"), ("duration_ns", "<u8"), ("oom_delay_ns", "<u8"),
                      ("oom_total_vm_kb", "<u8"), ("oom_anon_rss_kb", "<u8"), ("oom_file_rss_kb", "<u8"),
                      ("oom_shmem_rss_kb", "<u8"), ("oom_pgtables_kb", "<u8"), ("signal_delay_ns", "<u8"),
                      ("pid", "<u4"), ("ppid", "<u4"), ("exit_code", "<u4"), ("signal", "<u4"), ("flags", "<u4"),
                      ("oom_trigger_pid", "<u4"), ("signal_sender_pid", "<u4"), ("signal_sender_uid", "<u4"),
                      ("signal_code", "<i4"), ("oom_score_adj", "<i2"), ("pad", "<u2"), ("comm", "S16"),
                      ("signal_sender_comm", "S16")])  # fmt: skip
    rec = np.zeros(20000, dtype)
    rec["pid"] = np.arange(20000)
    rec["comm"] = b"sh"
    batcher = Batcher(node_identity("n"), {"process_exit": exit_columns}, 1 << 20, 64 << 10, 60.0)
    batches = batcher.add("process_exit", rec) + batcher.flush()
    assert all(len(b.payload) <= 64 << 10 for b in batches)
    assert [b.sequence for b in batches] == list(range(1, len(batches) + 1))
    decoded = [decode_batch(SCHEMAS["process_exit"], b.payload) for b in batches]
    assert np.concatenate([d.columns["pid"] for d in decoded]).tolist() == list(range(20000))
    # after the first (pessimistic) batch, batches fill up to the bound: few, not hundreds
    assert len(batches) < 2 * (20000 * 160 // (64 << 10)) + 4  # ~153 encoded bytes per row


def test_compressed_batches_are_bounded_by_their_compressed_size() -> None:
    """In fleet mode the byte bound is the Kafka message: the LZ4 frame, not the batch inside."""
    from fleetscope.codec import SCHEMAS, decode_batch
    from fleetscope.payload import unpack_message
    from node_agent.agent import STATS_DTYPE, STATS_STREAM, stats_columns
    from node_agent.batcher import Batcher, node_identity

    rec = np.zeros(30000, STATS_DTYPE)
    rec["value"] = np.arange(30000)
    rec["counter"] = b"emitted"
    batcher = Batcher(node_identity("n"), {STATS_STREAM: stats_columns}, 1 << 20, 64 << 10, 60.0, compress=True)
    batches = batcher.add(STATS_STREAM, rec) + batcher.flush()
    assert all(len(b.payload) <= 64 << 10 for b in batches)
    raw = [unpack_message(b.payload, b.headers(), 64 << 20) for b in batches]
    assert ("fs-encoding", b"lz4") in batches[0].headers()
    assert sum(len(r) for r in raw) > 4 * sum(len(b.payload) for b in batches)  # many more rows than uncompressed
    assert len(batches) < 30000 * 200 // (4 * (64 << 10))
    decoded = [decode_batch(SCHEMAS[STATS_STREAM], r) for r in raw]
    assert np.concatenate([d.columns["value"] for d in decoded]).tolist() == list(range(30000))


def test_padded_strings_equal_c_strings_on_nul_padded_fields() -> None:
    from node_agent.columns import padded_strings

    rng = np.random.default_rng(7)
    for width in (1, 7, 8, 15, 16, 21, 256):
        values = [bytes(rng.integers(1, 256, rng.integers(0, width + 1), dtype=np.uint8)) for _ in range(300)]
        rec = np.zeros(len(values), [("pid", "<u4"), ("s", f"S{width}"), ("flags", "u1")])
        rec["s"] = values  # NUL padded, as memset + bpf_probe_read_*_str or bpf_get_current_comm leave it
        padded, reference = padded_strings(rec["s"]), c_strings(rec["s"])
        assert padded.tolist() == reference.tolist() == values and padded.dtype == reference.dtype
    assert padded_strings(np.zeros(3, "S16")).tolist() == [b""] * 3


def test_records_read_straight_into_the_batch_cut_it_at_the_row_bound() -> None:
    """Batcher.add_from copies what a reader (RingBuffer.drain_with) hands over into the
    pending batch's columns; full batches are cut and the reader goes on into the next one."""
    from fleetscope.codec import SCHEMAS, decode_batch
    from node_agent.agent import STATS_DTYPE, STATS_STREAM, stats_columns
    from node_agent.batcher import Batcher, node_identity

    source = np.zeros(2500, STATS_DTYPE)
    source["value"] = np.arange(2500)
    source["counter"] = b"emitted"
    pos = 0

    def drain(take: Callable[[np.ndarray], None], most: int) -> int:
        nonlocal pos
        n = min(most, len(source) - pos, 700)  # a ring hands over what it holds, not more
        if n:
            take(source[pos : pos + n])
        pos += n
        return n

    batcher = Batcher(node_identity("n"), {STATS_STREAM: stats_columns}, 1000, 1 << 20, 60.0)
    got, batches = batcher.add_from(STATS_STREAM, STATS_DTYPE, drain)
    assert got == 700 and batches == [] and batcher.pending_rows == 700  # the reader ran dry
    got, batches = batcher.add_from(STATS_STREAM, STATS_DTYPE, drain)
    assert got == 1000 and [b.rows for b in batches] == [1000]  # 300 to fill it, 700 in the next
    while pos < len(source):
        got, more = batcher.add_from(STATS_STREAM, STATS_DTYPE, drain)
        batches += more
    batches += batcher.flush()
    assert [b.rows for b in batches] == [1000, 1000, 500]
    decoded = [decode_batch(SCHEMAS[STATS_STREAM], b.payload) for b in batches]
    assert np.concatenate([d.columns["value"] for d in decoded]).tolist() == list(range(2500))
    assert {v for d in decoded for v in d.columns["counter"].values} == {b"emitted"}


def test_narrowed_exec_records_batch_the_same_rows_as_whole_ones() -> None:
    """process_exec records copied only up to their batch's longest filename and argv
    (Stream.narrow) encode the same batches as whole records, also when a longer value
    arrives mid-batch and the batch's column is widened; bytes past args_len stay out."""
    from fleetscope.codec import SCHEMAS, StringColumn, decode_batch
    from node_agent.batcher import Batcher, node_identity
    from node_agent.probes.process import PROBE, exec_columns

    dtype = np.dtype({
        "names": ["time_ns", "cgroup_id", "pid", "ppid", "uid", "args_len", "argc", "flags", "comm", "filename",
                  "args"],
        "formats": ["<u8", "<u8", "<u4", "<u4", "<u4", "<u4", "<u4", "<u4", "S16", "S256", "S1024"],
        "offsets": [0, 8, 16, 20, 24, 28, 32, 36, 40, 56, 312], "itemsize": 1336,
    })  # fmt: skip
    argv = [b"sh\0-c\0exit 3\0", b"a\0\0\0\0\0\0\0\0\0\0b\0", b"x" * 100 + b"\0", b"y" * 1024, b""]
    names = [b"/bin/sh", b"/usr/bin/" + b"p" * 200, b"/x"]
    source = np.zeros(900, dtype)
    for i in range(len(source)):
        # long values only from row 400 on: the batch starts narrow and widens
        a = argv[i % 2] if i < 400 else argv[i % len(argv)]
        source[i]["args"] = a + b"tail" if len(a) < 1020 else a  # past args_len: not argv
        source[i]["args_len"] = len(a)
        source[i]["filename"] = names[0] if i < 400 else names[i % len(names)]
        source[i]["comm"], source[i]["pid"] = b"sh", i
    ring = np.zeros(len(source), [("hdr", "<u8"), ("rec", dtype)])  # a strided view, as in the ring
    ring["rec"] = source
    pos = 0

    def drain(take: Callable[[np.ndarray], None], most: int) -> int:
        nonlocal pos
        n = min(most, len(source) - pos, 150)
        take(ring["rec"][pos : pos + n])
        pos += n
        return n

    narrow = PROBE.streams[0].narrow
    builders = {"process_exec": lambda rec, _: exec_columns(rec, 0)}  # the same times in both
    batches = []
    batcher = Batcher(node_identity("n"), builders, 700, 1 << 30, 60.0)
    while pos < len(source):
        batches += batcher.add_from("process_exec", dtype, drain, narrow)[1]
    batches += batcher.flush()
    whole = Batcher(node_identity("n"), builders, 700, 1 << 30, 60.0)
    expected = whole.add("process_exec", source) + whole.flush()
    assert [b.rows for b in batches] == [b.rows for b in expected] == [700, 200]
    schema = SCHEMAS["process_exec"]
    for got, want in zip(batches, expected, strict=True):
        g, w = decode_batch(schema, got.payload), decode_batch(schema, want.payload)
        for name, column in w.columns.items():
            mine = g.columns[name]
            if isinstance(column, StringColumn):
                assert isinstance(mine, StringColumn) and mine.decoded().tolist() == column.decoded().tolist(), name
            else:
                assert not isinstance(mine, StringColumn) and np.array_equal(mine, column), name
    column = decode_batch(schema, batches[1].payload).columns["args"]
    assert isinstance(column, StringColumn)
    args = column.decoded().tolist()
    assert "a          b" in args and "y" * 1024 in args and not any("tail" in a for a in args)


def test_a_batch_being_filled_holds_at_most_its_buffer_bound() -> None:
    """However high the row and byte bounds, a batch's columns hold at most Batcher.BUFFER_BYTES
    (the agent's memory stays bounded with wide records)."""
    from node_agent.agent import STATS_DTYPE, STATS_STREAM, stats_columns
    from node_agent.batcher import Batcher, node_identity

    rec = np.zeros(60000, STATS_DTYPE)
    rec["value"] = np.arange(60000)
    batcher = Batcher(node_identity("n"), {STATS_STREAM: stats_columns}, 1 << 20, 1 << 30, 60.0)
    batches = batcher.add(STATS_STREAM, rec) + batcher.flush()
    assert sum(b.rows for b in batches) == 60000
    assert max(b.rows for b in batches) <= Batcher.BUFFER_BYTES // STATS_DTYPE.itemsize
