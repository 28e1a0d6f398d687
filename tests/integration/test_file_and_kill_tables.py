"""End to end through `fleetscope run`: opens, signal deaths and an OOM kill caused by this
test become exactly the expected rows of fleet.file_open, fleet.fatal_signals and
fleet.oom_kills (real probes, real embedded ClickHouse)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from node_agent.bcc_loader import import_bcc
from tests.support.memcg import memory_cgroup
from tests.support.opens import openat
from tests.support.procs import FleetscopeProcess
from tests.support.real import require_real

pytestmark = [pytest.mark.root, pytest.mark.integration]


def query(data_dir: Path, sql: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "fleetscope", "query", "--data-dir", str(data_dir), "--format", "tsv", sql],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [line.split("\t") for line in out.stdout.splitlines()[1:]]


def require_bcc() -> None:
    """bcc importable (Debian's python3-bpfcc), for the fallback loader's run."""
    try:
        import_bcc()
    except (ImportError, OSError) as e:
        require_real(f"bcc fallback: {e}")


def sleeper() -> subprocess.Popen[bytes]:
    """`sleep 30`, returned once it has exec'd."""
    p = subprocess.Popen(["sleep", "30"])
    deadline = time.monotonic() + 60
    while Path(f"/proc/{p.pid}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline, "sleep did not exec"
        time.sleep(0.005)
    return p


@pytest.mark.parametrize("loader", ["libbpf", "bcc"])
def test_opens_kills_and_an_oom_become_rows(bpf_objects: Path, tmp_path: Path, loader: str) -> None:
    top = Path(f"/tmp/fs-e2e-{uuid.uuid4().hex[:12]}")
    watched, outside = top / "watched", top / "outside"
    watched.mkdir(parents=True)
    outside.mkdir()
    if loader == "bcc":
        require_bcc()
    data_dir = tmp_path / "store"
    run = FleetscopeProcess(
        "run", "--data-dir", str(data_dir), "--bpf-dir", str(bpf_objects), "--loader", loader,
        "--probes", "file_open,oom_kills,fatal_signals", "--file-open-prefixes", f"{watched}/",
        "--status", "log", "--status-interval", "1s", log=tmp_path / "run.log",
    )  # fmt: skip
    try:
        with run, memory_cgroup(20 << 20) as cg:
            for probe in ("file_open", "oom_kills", "fatal_signals"):
                run.wait_for_log(f"probe {probe} running", 120)
            opens = [openat(f"{watched}/missing-{i}", os.O_RDONLY) for i in range(100)]
            opens.append(openat(f"{watched}/made", os.O_CREAT | os.O_WRONLY, 0o600))
            openat(f"{outside}/made", os.O_CREAT | os.O_WRONLY, 0o600)  # a success outside: no row
            killed = {}
            for sig in (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
                child = sleeper()
                os.kill(child.pid, sig)
                assert child.wait() == -sig
                killed[child.pid] = sig
            hog, hog_cgroup = cg.spawn_hog(), os.stat(cg.v2_dir).st_ino
            assert hog.wait(60) == -signal.SIGKILL
            killed[hog.pid] = signal.SIGKILL
            run.stop(signal.SIGINT)  # shutdown drains the rings and flushes every batch
        assert run.returncode == 0, run.log_text()
    finally:
        shutil.rmtree(top)

    rows = query(
        data_dir,
        "SELECT path, syscall, fd, errno, flags, mode, pid, tid, comm FROM fleet.file_open "
        f"WHERE startsWith(path, '{top}/') ORDER BY path",
    )
    got = sorted((r[0], int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows)
    expected = sorted((o.path, max(o.ret, -1), max(-o.ret, 0), o.flags, o.mode) for o in opens)
    assert got == expected  # path, fd (-1 on failure), errno, flags, mode: each open once
    assert all(r[1] == "openat" and r[6] == r[7] == str(os.getpid()) for r in rows)

    deaths = query(
        data_dir,
        "SELECT pid, signal, code, sender_known, sender_pid, comm FROM fleet.fatal_signals "
        f"WHERE pid IN ({','.join(map(str, killed))}) ORDER BY pid",
    )
    assert {int(r[0]): int(r[1]) for r in deaths} == killed and len(deaths) == len(killed)
    by_pid = {int(r[0]): r for r in deaths}
    assert by_pid[hog.pid][2:5] == ["128", "1", str(hog.pid)]  # SI_KERNEL, sent in the hog's context
    assert all(by_pid[p][2:5] == ["0", "1", str(os.getpid())] for p in killed if p != hog.pid)

    ooms = query(
        data_dir,
        f"SELECT pid, comm, anon_rss_kb, trigger_pid, cgroup_id FROM fleet.oom_kills WHERE pid = {hog.pid}",
    )
    assert len(ooms) == 1
    pid, comm, anon_kb, trigger, cgroup_id = ooms[0]
    assert (comm, trigger) == (Path(sys.executable).name[:15], pid)
    assert 8 << 10 <= int(anon_kb) <= 20 << 10
    assert int(cgroup_id) == hog_cgroup

    batches = query(
        data_dir,
        "SELECT stream, count(), uniqExact(sequence), max(sequence) FROM fleet.batches GROUP BY stream",
    )
    assert {b[0] for b in batches} >= {"file_open", "fatal_signals", "oom_kills"}
    for stream, n, uniq, top_seq in batches:
        assert n == uniq == top_seq, f"{stream}: batch sequence has gaps or duplicates"
