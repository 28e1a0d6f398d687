"""Ring-buffer records become batch columns with C-string semantics, vectorised."""

from __future__ import annotations

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

    dtype = np.dtype([("time_ns", "<u8"), ("cgroup_id", "<u8"), ("duration_ns", "<u8"), ("pid", "<u4"),
                      ("ppid", "<u4"), ("exit_code", "<u4"), ("signal", "<u4"), ("comm", "S16")])  # fmt: skip
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
    assert len(batches) < 2 * (20000 * 40 // (64 << 10)) + 4
