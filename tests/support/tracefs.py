"""Run a program with tracefs mounted in a private mount namespace, so tests can exercise
the classic-tracepoint programs on a host that has no tracefs, leaving the host untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.real import require_real

REPO = Path(__file__).resolve().parents[2]


def run_in_private_tracefs(
    argv: Sequence[str], what: str, timeout: float = 60, env: Mapping[str, str] | None = None
) -> Any:
    """Run argv there and return its standard output parsed as JSON."""
    if shutil.which("unshare") is None:
        require_real(f"{what}: `unshare` (util-linux) is needed for a private tracefs")
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tracefs tracefs /sys/kernel/tracing && exec "$@"', "sh", *argv],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )  # fmt: skip
    if out.returncode and "tracefs" in out.stderr and "mount" in out.stderr:
        require_real(f"{what}: cannot mount a private tracefs: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
