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
