"""Loss is counted exactly: a tiny ring buffer overflows under a real process storm, and
fleet.pipeline_loss accounts for every event the kernel emitted."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.loader import cgroup2_mount
from tests.support.procs import FleetscopeProcess

pytestmark = [pytest.mark.root, pytest.mark.integration]


@pytest.fixture
def storm_cgroup() -> Iterator[Path]:
    path = cgroup2_mount() / f"fleetscope-storm-{uuid.uuid4().hex[:8]}.slice"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


def query(data_dir: Path, sql: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "fleetscope", "query", "--data-dir", str(data_dir), "--format", "tsv", sql],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [line.split("\t") for line in out.stdout.splitlines()[1:]]


def test_ring_overflow_is_counted_exactly(bpf_objects: Path, storm_cgroup: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    run = FleetscopeProcess(
        "run", "--data-dir", str(data_dir), "--bpf-dir", str(bpf_objects), "--status", "log", "--sql-listen", "off",
        "--ring-bytes", "4096", "--filter-cgroup", str(storm_cgroup), "--stats-interval", "1s",
        log=tmp_path / "run.log",
    )  # fmt: skip
    with run:
        run.wait_for_log("probe process running", 120)
        # 4 spawners in the cgroup, 1500 processes each: far more than a 4 KiB ring holds
        # between two drains (it fits three exec records)
        script = f"echo $$ > {storm_cgroup}/cgroup.procs; i=0; while [ $i -lt 1500 ]; do /bin/true; i=$((i+1)); done"
        storms = [subprocess.Popen(["/bin/sh", "-c", script]) for _ in range(4)]
        assert all(s.wait() == 0 for s in storms)
        run.stop(signal.SIGINT)
    assert run.returncode == 0, run.log_text()[-3000:]
    rows = query(
        data_dir,
        "SELECT stream, sum(kernel_emitted), sum(kernel_dropped), sum(agent_dropped), sum(stored), "
        "sum(sequence_gaps), sum(duplicates) FROM fleet.pipeline_loss "
        "WHERE stream IN ('process_exec', 'process_exit') GROUP BY stream ORDER BY stream",
    )
    totals = {r[0]: [int(v) for v in r[1:]] for r in rows}
    assert set(totals) == {"process_exec", "process_exit"}
    for stream, (emitted, dropped, agent_dropped, stored, gaps, dups) in totals.items():
        assert emitted >= 6000, (stream, totals)
        assert agent_dropped == gaps == dups == 0
        assert dropped == emitted - stored, (stream, totals)
        table_rows = int(query(data_dir, f"SELECT count() FROM fleet.{stream}")[0][0])
        assert table_rows == stored
    assert totals["process_exec"][1] > 0, "the 4 KiB ring never overflowed: the test proves nothing"
