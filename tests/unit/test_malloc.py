"""The long-running commands keep freed batch buffers in the heap (fleetscope/malloc.py)."""

from __future__ import annotations

import os
import subprocess
import sys

# Allocate and free 40 batch-sized buffers (4 MiB, written), then print the minor page faults taken.
CHURN = """
import resource, sys
from fleetscope import malloc
print(malloc.keep_heap(), file=sys.stderr)
bytes(bytearray(4 << 20))  # the first one grows the heap either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    bytes(bytearray(4 << 20))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def churn(env: dict[str, str]) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout), out.stderr.strip()


def test_batch_buffers_reuse_warm_memory() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    kept, applied = churn(env)
    assert applied == "True"
    # glibc's defaults: every 4 MiB buffer is mmap'ed afresh, ~1,000 page faults each time
    fresh, skipped = churn({**env, "MALLOC_TOP_PAD_": "131072"})  # a user's own setting wins: defaults stay
    assert skipped == "False"
    assert fresh > 40 * 500
    assert kept < fresh / 20
