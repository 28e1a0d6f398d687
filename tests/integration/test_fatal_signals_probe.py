"""The fatal_signals probe in the running kernel: each process this test kills with
SIGKILL, SIGSEGV, SIGBUS or SIGABRT, by kill() or by a real fault or abort(), is exactly one
row with its sender; processes that survive a signal, die of another one, or just exit
with threads are no row.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from node_agent.loader import LoadedProbe, cgroup2_mount, lent_maps, load_probe, mark_joined
from tests.support.tracefs import run_in_private_tracefs

pytestmark = pytest.mark.root

SI_USER, SI_TKILL, SI_KERNEL = 0, -6, 0x80
SEGV_MAPERR, BUS_ADRERR = 1, 2
PYTHON_COMM = Path(sys.executable).name.encode()[:15]
PIPED_CORES = Path("/proc/sys/kernel/core_pattern").read_text().startswith("|")


@dataclass(frozen=True)
class Settings:
    """The agent settings the loader reads (fleetscope.config.AgentOptions in the agent)."""

    bpf_dir: Path
    ring_bytes: int = 1 << 20
    filter_pid: int = 0
    filter_cgroup: str = ""
    loader: str = "libbpf"
    args_max: int = 512
    file_open_prefixes: tuple[str, ...] = ()
    file_open_all: bool = False


@pytest.fixture
def probe(bpf_objects: Path) -> Iterator[LoadedProbe]:
    with load_probe("fatal_signals", Settings(bpf_objects)) as p:
        p.rings["fatal_signals"].drain()
        yield p


@pytest.fixture
def no_core_dumps() -> Iterator[None]:
    """Children inherit RLIMIT_CORE 0: a fatal SIGSEGV/SIGBUS/SIGABRT writes no core file."""
    old = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, old[1]))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, old)


def own_cgroup_id() -> int:
    line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
    return os.stat(cgroup2_mount() / line.split("::", 1)[1].lstrip("/")).st_ino


def started(argv: list[str], comm: bytes, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A child that has exec'd argv (its comm is `comm`); a Python one has also printed
    "ready" (after its setup)."""
    python = argv[0] == sys.executable
    p = subprocess.Popen(argv, stdout=subprocess.PIPE if python else None, cwd=cwd)
    if python:
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        p.stdout.close()
    deadline = time.monotonic() + 60
    while Path(f"/proc/{p.pid}/comm").read_bytes().strip() != comm:
        assert time.monotonic() < deadline, f"{argv} did not exec"
        time.sleep(0.005)
    return p


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


READY = "print('ready', flush=True)\n"
SLEEP_THREADS = (
    "import threading, time\n[threading.Thread(target=time.sleep, args=(30,)).start() for _ in range(4)]\n" + READY
)
HANDLES_SEGV = "import signal, time\nsignal.signal(signal.SIGSEGV, lambda *a: None)\n" + READY
SEGFAULT = "import ctypes\nctypes.string_at(0)\n"
ORPHAN_FAULT = (
    "import ctypes, threading, time\n"
    "threading.Thread(target=lambda: (time.sleep(0.3), ctypes.string_at(0))).start()\n"
    "ctypes.CDLL(None).pthread_exit(None)\n"
)
BUS_ERROR = (
    "import mmap, os, tempfile\n"
    "fd, path = tempfile.mkstemp()\nos.unlink(path)\nos.ftruncate(fd, mmap.PAGESIZE)\n"
    "m = mmap.mmap(fd, mmap.PAGESIZE)\nos.ftruncate(fd, 0)\nm[0]\n"
)


def test_each_fatal_signal_is_one_row_with_its_sender(probe: LoadedProbe, no_core_dumps: None) -> None:
    me, t0 = os.getpid(), time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    my_comm = Path("/proc/self/comm").read_bytes().strip()
    # pid -> (signal, sender pid or None for "itself", si_code, comm)
    expected: dict[int, tuple[int, int | None, int, bytes]] = {}
    survivors: list[int] = []

    # kill() from this process, one signal per sleeping child
    for sig in (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
        child = started(["sleep", "30"], b"sleep")
        os.kill(child.pid, sig)
        assert child.wait() == -sig
        expected[child.pid] = (sig, me, SI_USER, b"sleep")

    # kill -BUS from a shell: the shell is the sender
    sh = subprocess.run(
        ["sh", "-c", "sleep 30 & sleep 0.2; kill -BUS $!; echo $!; wait $!; echo $?"],
        capture_output=True, check=True,
    )  # fmt: skip
    victim, status = (int(x) for x in sh.stdout.split())
    assert status == 128 + signal.SIGBUS
    expected[victim] = (signal.SIGBUS, -1, SI_USER, b"sleep")  # -1: the shell, checked below

    # real faults and abort(): the process is its own sender, with the kernel's si_code
    for code, sig, si_code in (
        (SEGFAULT, signal.SIGSEGV, SEGV_MAPERR),
        (BUS_ERROR, signal.SIGBUS, BUS_ADRERR),
        ("import os\nos.abort()\n", signal.SIGABRT, SI_TKILL),
        ("import ctypes, threading, time\nthreading.Thread(target=ctypes.string_at, args=(0,)).start()\n"
         "time.sleep(30)\n", signal.SIGSEGV, SEGV_MAPERR),  # a thread faults: the process dies
    ):  # fmt: skip
        child = subprocess.Popen(py(code))
        assert child.wait() == -sig
        expected[child.pid] = (sig, None, si_code, PYTHON_COMM)

    # several threads, one SIGKILL: one row, not one per thread
    child = started(py(SLEEP_THREADS), PYTHON_COMM)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    expected[child.pid] = (signal.SIGKILL, me, SI_USER, PYTHON_COMM)

    # survives a SIGSEGV it handles, then dies of SIGKILL: the row names the SIGKILL
    child = started(py(HANDLES_SEGV + "time.sleep(30)\n"), PYTHON_COMM)
    os.kill(child.pid, signal.SIGSEGV)
    time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    expected[child.pid] = (signal.SIGKILL, me, SI_USER, PYTHON_COMM)

    # no row: a handled SIGSEGV then a normal exit, SIGTERM, threads that exit normally
    child = started(py("import signal, sys, time\nsignal.signal(signal.SIGSEGV, lambda *a: sys.exit(0))\n"
                       + READY + "time.sleep(30)\n"), PYTHON_COMM)  # fmt: skip
    os.kill(child.pid, signal.SIGSEGV)
    assert child.wait() == 0
    survivors.append(child.pid)
    term = started(["sleep", "30"], b"sleep")
    term.terminate()
    assert term.wait() == -signal.SIGTERM
    survivors.append(term.pid)
    threads = subprocess.Popen(py("import threading\n[threading.Thread(target=print).start() for _ in range(4)]\n"
                                  "raise SystemExit(3)\n"), stdout=subprocess.DEVNULL)  # fmt: skip
    assert threads.wait() == 3
    survivors.append(threads.pid)

    time.sleep(0.05)
    rows = probe.rings["fatal_signals"].drain()
    t1 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    ours = rows[np.isin(rows["pid"], list(expected) + survivors)]
    assert sorted(ours["pid"].tolist()) == sorted(expected), "exactly one row per killed process"

    for r in ours:
        pid = int(r["pid"])
        sig, sender, si_code, comm = expected[pid]
        assert (r["signal"], r["code"], r["comm"]) == (sig, si_code, comm), pid
        assert r["flags"] & 2  # sender known
        assert not r["flags"] & 4  # no process probe reads the senders map: the row's own span
        if not PIPED_CORES:  # RLIMIT_CORE 0 does not stop a core_pattern pipe helper
            assert not r["flags"] & 1
        assert r["uid"] == r["sender_uid"] == os.getuid()
        assert r["cgroup_id"] == r["sender_cgroup_id"] == own_cgroup_id()
        assert t0 <= r["time_ns"] <= t1 and 0 < r["delay_ns"] < t1 - t0
        if sender is None:
            assert (r["sender_pid"], r["sender_comm"]) == (pid, comm)
        elif sender == me:
            assert (r["sender_pid"], r["sender_comm"], r["ppid"]) == (me, my_comm, me)
        else:
            assert r["sender_comm"] == b"sh" and r["sender_pid"] == r["ppid"] != me
    assert probe.stats()["fatal_signals"]["dropped"] == 0


@pytest.mark.parametrize("process_exit_runs", ["last", "first"])
def test_the_process_exit_row_carries_the_signal_and_its_sender(
    bpf_objects: Path, no_core_dumps: None, process_exit_runs: str
) -> None:
    """With the process probe reading fatal_signals' senders map (as the agent loads them),
    each killed process's process_exit record has the sender of its fatal_signals row, and
    the row says so; whichever of the two sched_process_exit programs runs first."""
    settings = Settings(bpf_objects)
    with (
        load_probe("fatal_signals", settings) as fatal,
        load_probe("process", settings, reuse=lent_maps([fatal])) as proc,
    ):
        assert proc.borrowed == ("fatal_signals_senders",)
        mark_joined(proc, [fatal, proc])
        if process_exit_runs == "first":  # programs on one raw tracepoint run in attach order
            fatal.links["sched/sched_process_exit"].destroy()
            fatal.links["sched/sched_process_exit"] = fatal.obj.attach("raw_tp__sched_process_exit")
        for ring in (*fatal.rings.values(), *proc.rings.values()):
            ring.drain()
        pids = []
        for sig in (signal.SIGKILL, signal.SIGSEGV):  # kill() from this process
            child = started(["sleep", "30"], b"sleep")
            os.kill(child.pid, sig)
            assert child.wait() == -sig
            pids.append(child.pid)
        for code in (SEGFAULT, "import os\nos.abort()\n"):  # the process is its own sender
            child = subprocess.Popen(py(code))
            child.wait()
            pids.append(child.pid)
        child = started(py(SLEEP_THREADS), PYTHON_COMM)  # threads: the leader may not exit last
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        pids.append(child.pid)
        # the leader leaves first (pthread_exit), then a thread faults: the exit record of the
        # leader says nothing of the SIGSEGV, so the row keeps it (in_process_exit 0)
        orphaned = subprocess.Popen(py(ORPHAN_FAULT))
        assert orphaned.wait() == -signal.SIGSEGV
        term = started(["sleep", "30"], b"sleep")  # SIGTERM: no fatal_signals row, no sender
        term.terminate()
        assert term.wait() == -signal.SIGTERM
        time.sleep(0.05)
        rows = fatal.rings["fatal_signals"].drain()
        exits = proc.rings["process_exit"].drain()
    by_pid = {int(r["pid"]): r for r in rows if int(r["pid"]) in pids}
    exit_of = {int(x["pid"]): x for x in exits if int(x["pid"]) in (*pids, term.pid)}
    assert sorted(by_pid) == sorted(pids) and sorted(exit_of) == sorted((*pids, term.pid))
    for pid, r in by_pid.items():
        x = exit_of[pid]
        assert r["flags"] & 6 == 6  # sender known, carried by the process_exit record
        assert x["flags"] == 2 | 4  # PROCESS_EXIT_SENDER_KNOWN | PROCESS_EXIT_SIGNALS_JOINED
        assert (x["signal"], x["signal_code"], x["signal_sender_pid"], x["signal_sender_uid"]) == (
            r["signal"], r["code"], r["sender_pid"], r["sender_uid"],
        )  # fmt: skip
        assert x["signal_sender_comm"] == r["sender_comm"] and x["oom_delay_ns"] == 0
        # both measure from the same generation, each to its own exit (the leader's, the last thread's)
        generated = r["time_ns"] - r["delay_ns"]
        assert x["time_ns"] - x["signal_delay_ns"] == generated
    t = exit_of[term.pid]
    assert (t["signal"], t["flags"], t["signal_sender_pid"]) == (signal.SIGTERM, 4, 0)
    (o,) = rows[rows["pid"] == orphaned.pid]
    (ox,) = exits[exits["pid"] == orphaned.pid]
    assert (o["signal"], o["flags"] & 4, ox["signal"], ox["flags"]) == (signal.SIGSEGV, 0, 0, 4)


def test_core_dump_is_flagged_and_other_signals_are_not_rows(probe: LoadedProbe, tmp_path: Path) -> None:
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    quit_dir, segv_dir = tmp_path / "quit", tmp_path / "segv"
    quit_dir.mkdir()
    segv_dir.mkdir()
    old = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (old[1], old[1]))
    try:
        quit_ = started(["sleep", "30"], b"sleep", cwd=quit_dir)
        os.kill(quit_.pid, signal.SIGQUIT)  # dumps core too, but is not one of the four
        quit_.wait()
        child = started(["sleep", "30"], b"sleep", cwd=segv_dir)
        os.kill(child.pid, signal.SIGSEGV)
        assert child.wait() == -signal.SIGSEGV
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, old)
    time.sleep(0.05)
    rows = probe.rings["fatal_signals"].drain()
    assert quit_.pid not in rows["pid"]
    row = rows[rows["pid"] == child.pid]
    assert len(row) == 1 and row["signal"][0] == signal.SIGSEGV
    if "/" not in pattern and not pattern.startswith("|"):  # core files land in the cwd
        cores = [p for p in segv_dir.iterdir() if p.name.startswith(pattern.split("%")[0])]
        assert bool(row["flags"][0] & 1) == bool(cores)


CLASSIC = r"""
import json, os, resource, signal, subprocess, sys, time
from dataclasses import dataclass
from pathlib import Path
from node_agent.loader import load_probe

@dataclass(frozen=True)
class Settings:
    bpf_dir: Path = Path(sys.argv[1])
    ring_bytes: int = 1 << 16
    filter_pid: int = 0
    filter_cgroup: str = ""
    loader: str = "libbpf"
    args_max: int = 512
    file_open_prefixes: tuple = ()
    file_open_all: bool = False

resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
expected = {}
with load_probe("fatal_signals", Settings()) as p:
    p.rings["fatal_signals"].drain()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time\nprint('ready', flush=True)\ntime.sleep(30)"],
                               stdout=subprocess.PIPE)
    sleeper.stdout.readline()
    sleeper.stdout.close()
    os.kill(sleeper.pid, signal.SIGKILL)
    sleeper.wait()
    expected[sleeper.pid] = [9, 0, os.getpid()]
    for code, sig, si_code in (("import ctypes\nctypes.string_at(0)", 11, 1), ("import os\nos.abort()", 6, -6)):
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait()
        expected[child.pid] = [sig, si_code, child.pid]
    time.sleep(0.05)
    rows = p.rings["fatal_signals"].drain()
    got = {int(r["pid"]): [int(r["signal"]), int(r["code"]), int(r["sender_pid"])] for r in rows
           if int(r["pid"]) in expected and r["flags"] & 2}
    print(json.dumps({"attached": p.attached, "expected": expected, "got": got,
                      "rows": int(sum(int(r["pid"]) in expected for r in rows))}))
"""


def test_classic_tracepoints_record_the_same_deaths(bpf_objects: Path) -> None:
    result = run_in_private_tracefs([sys.executable, "-c", CLASSIC, str(bpf_objects)], "fatal_signals probe")
    assert result["attached"] == {
        "signal/signal_generate": "tracepoint__signal__signal_generate",
        "sched/sched_process_exit": "tracepoint__sched__sched_process_exit",
    }
    assert result["got"] == result["expected"] and result["rows"] == 3
