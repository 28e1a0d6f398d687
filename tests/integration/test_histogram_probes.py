"""The in-kernel histogram probes in the running kernel: syscall_latency, block_io_latency
and runqueue_latency count the activity this test creates, in its own cgroups, exactly
where it can be isolated; no sample is lost between read and reset of a generation; and
the rows reach ClickHouse where the README's p50/p99 queries give sane numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fleetscope.codec import SCHEMAS
from fleetscope.config import AgentOptions
from node_agent.histogram import HistogramReader, collect, row_dtype, take
from node_agent.libbpf import BpfObject
from node_agent.loader import LoadedProbe, cgroup2_mount, load_probe
from node_agent.probes import get_probe
from tests.support.procs import FleetscopeProcess
from tests.support.real import require_real
from tests.support.sql_http import free_port
from tests.support.tracefs import run_in_private_tracefs

pytestmark = [pytest.mark.root, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
HISTOGRAM_PROBES = ("syscall_latency", "block_io_latency", "runqueue_latency")
NR_GETPPID, NR_CLOCK_NANOSLEEP = 110, 230  # x86_64
BUCKET_1_5_MS = 20  # 1.5 ms lies in [2^20, 2^21) ns


def settings(bpf_dir: Path, **changes: object) -> AgentOptions:
    return dataclasses.replace(AgentOptions(bpf_dir=bpf_dir), **changes)


@contextmanager
def loaded(name: str, bpf_dir: Path, **changes: object) -> Iterator[tuple[LoadedProbe, HistogramReader]]:
    with load_probe(name, settings(bpf_dir, **changes)) as probe:
        assert probe.histograms is not None
        yield probe, probe.histograms


def rows_of(reader: HistogramReader, stream: str) -> np.ndarray:
    """Every row collected so far (take() empties the reader)."""
    parts = [rows for s, rows in take([reader]) if s == stream]
    return np.concatenate(parts) if parts else np.zeros(0, reader.maps[0].dtype)


@contextmanager
def new_cgroup(tag: str) -> Iterator[tuple[Path, int]]:
    """A fresh cgroup v2 directory (kubelet-shaped name) and its id (the inode number)."""
    path = cgroup2_mount() / f"fleetscope-{tag}-{uuid.uuid4().hex[:8]}.slice"
    path.mkdir()
    try:
        yield path, os.stat(path).st_ino
    finally:
        path.rmdir()


def run_in(cgroup: Path, code: str, *args: str, stdin: bool = False, stdout: bool = False) -> subprocess.Popen[str]:
    """Python code in a process that joined cgroup before exec (so all of it counts there);
    stdin / stdout: pipes to and from it (finish with communicate(), or use it as a context)."""
    return subprocess.Popen(
        ["/bin/sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && code=$1 && shift && exec "$0" -c "$code" "$@"',
         sys.executable, code, *args],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE if stdout else None, text=True,
    )  # fmt: skip


# n getppid, then `sleeps` relative clock_nanosleep(CLOCK_MONOTONIC, 0, 1.5 ms). Relative, unlike
# time.sleep (an absolute deadline taken before the call): the kernel sleeps at least 1.5 ms from
# its own entry, so every measured syscall is >= 1.5 ms. How much longer depends on the scheduler,
# so the workload times each call from outside (and the getppid loop as a whole) and prints those
# wall times as JSON: a syscall lies inside its wrapper, so they bound what the probe may measure.
SYSCALLS = """
import ctypes, json, os, sys, time
n, sleeps = int(sys.argv[1]), int(sys.argv[2])
t0 = time.monotonic_ns()
for _ in range(n):
    os.getppid()
getppid_ns = time.monotonic_ns() - t0
libc = ctypes.CDLL(None, use_errno=True)
class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]
req = timespec(0, 1_500_000)
sleeps_ns = []
for _ in range(sleeps):
    t0 = time.monotonic_ns()
    err = libc.clock_nanosleep(1, 0, ctypes.byref(req), None)  # CLOCK_MONOTONIC, relative
    sleeps_ns.append(time.monotonic_ns() - t0)
    assert err == 0, os.strerror(err)
print(json.dumps({"getppid_ns": getppid_ns, "sleeps_ns": sleeps_ns}))
"""
SLEEP_NS = 1_500_000  # what SYSCALLS asks each clock_nanosleep for


def slot(ns: int) -> int:
    """The histogram slot of a duration, as the probe computes it: floor(log2), the last slot open."""
    return min(max(ns, 1).bit_length() - 1, 31)


def at_or_above(hist: np.ndarray) -> np.ndarray:
    """Per slot i, how many samples lie in slot i or higher."""
    return np.cumsum(hist[::-1])[::-1]


def assert_sums_inside_buckets(rows: np.ndarray) -> None:
    """Every row's sum_ns is the sum of samples each inside its slot [2^i, 2^(i+1)) ns (slot 0
    from 0, the last slot open): at least the lower edges' sum, below the upper edges' sum."""
    slots = rows["buckets"].shape[1]
    lower = np.array([0] + [1 << i for i in range(1, slots)], np.uint64)
    upper = np.array([1 << (i + 1) for i in range(slots)], np.uint64)
    buckets = rows["buckets"].astype(np.uint64)
    assert (rows["sum_ns"] >= buckets @ lower).all()
    bounded = buckets[:, -1] == 0
    assert (rows["sum_ns"][bounded] < (buckets @ upper)[bounded]).all()


@pytest.fixture(scope="module")
def bpf_dir(bpf_objects: Path) -> Path:
    if os.uname().machine != "x86_64":
        require_real("histogram probes: the syscall numbers in these tests are x86_64's")
    return bpf_objects


# --- syscall_latency ----------------------------------------------------------------------


def test_syscalls_of_a_cgroup_are_counted_exactly_and_bucketed(bpf_dir: Path) -> None:
    n, sleeps = 5000, 40
    with new_cgroup("sys") as (cgroup, cgid), loaded("syscall_latency", bpf_dir) as (probe, reader):
        assert probe.attached == {
            "raw_syscalls/sys_enter": "raw_tp__sys_enter",
            "raw_syscalls/sys_exit": "raw_tp__sys_exit",
        }
        child = run_in(cgroup, SYSCALLS, str(n), str(sleeps), stdout=True)
        out, _ = child.communicate()
        assert child.returncode == 0
        walls = np.array(json.loads(out)["sleeps_ns"], np.int64)  # each sleep's wrapper
        probe.detach()  # nothing after this: the totals below are final
        collect([reader])
        rows = rows_of(reader, "syscall_latency")
        stats = probe.stats()["syscall_latency"]

    mine = rows[rows["cgroup_id"] == cgid]
    by_nr = {int(nr): mine[mine["nr"] == nr] for nr in np.unique(mine["nr"])}
    assert by_nr[NR_GETPPID]["count"].sum() == n  # exactly: nothing else calls getppid there
    sleep = by_nr[NR_CLOCK_NANOSLEEP]
    assert sleep["count"].sum() == sleeps
    hist = sleep["buckets"].sum(axis=0)
    # each sleep measured >= 1.5 ms (what it asked) and <= its wrapper's wall time, however
    # late the scheduler woke it: the slots lie between, call by call. Unpaired, that reads:
    # nothing below the 1.5 ms slot, and at or above every slot no more samples than wrappers
    # (on an idle machine the wrappers are all in the 1.5 ms slot, so the samples must be too)
    assert hist[:BUCKET_1_5_MS].sum() == 0  # never shorter than asked
    wall_hist = np.bincount([slot(int(w)) for w in walls], minlength=hist.size)
    assert (at_or_above(hist) <= at_or_above(wall_hist)).all(), (hist.tolist(), wall_hist.tolist())
    assert SLEEP_NS * sleeps <= sleep["sum_ns"].sum() <= walls.sum()
    # every row: count is its histogram's sum, the mean lies inside the used buckets
    assert (rows["count"] == rows["buckets"].sum(axis=1)).all() and (rows["count"] > 0).all()
    assert_sums_inside_buckets(rows)
    assert (rows["interval_ns"] > 0).all() and (rows["pad"] == 0).all()
    # samples recorded == kernel emitted - dropped, across all intervals, once detached
    assert stats["dropped"] == 0
    assert rows["count"].sum() == stats["emitted"]


# getppid in a tight loop until stdin ends; prints how many calls it made
GETPPID_UNTIL_EOF = """
import os, sys, threading
eof = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), eof.set()), daemon=True).start()
calls = 0
while not eof.is_set():
    for _ in range(1000):
        os.getppid()
    calls += 1000
print(calls)
"""


def test_flipping_generations_loses_no_sample(bpf_dir: Path) -> None:
    """getppid in a tight loop while the agent side ends an interval every few ms; each
    generation is read 5 keys per batch call, so reads span many calls."""
    n = 300_000  # at least this many calls, in at least 5 intervals, all while flipping
    deadline = time.monotonic() + 60
    parts: list[np.ndarray] = []
    spanned = seen = flips = 0
    with new_cgroup("flip") as (cgroup, cgid), loaded("syscall_latency", bpf_dir) as (probe, reader):
        reader.maps[0].capacity = 5
        with run_in(cgroup, GETPPID_UNTIL_EOF, stdin=True, stdout=True) as child:
            assert child.stdin is not None and child.stdout is not None
            # the loop runs until the flips have seen it in enough intervals, however slowly
            # it gets the CPU; it ends only when told, so flipping goes on until its last call
            while child.poll() is None:
                assert time.monotonic() < deadline, f"{seen} calls in {spanned} intervals after 60 s ({flips} flips)"
                collect([reader])
                flips += 1
                parts.append(part := rows_of(reader, "syscall_latency"))
                ours = part[(part["cgroup_id"] == cgid) & (part["nr"] == NR_GETPPID)]
                spanned, seen = spanned + (len(ours) > 0), seen + int(ours["count"].sum())
                if spanned >= 5 and seen >= n and not child.stdin.closed:
                    child.stdin.close()
                time.sleep(0.002)
            assert child.returncode == 0
            calls = int(child.stdout.read())
        probe.detach()
        collect([reader])
        parts.append(rows_of(reader, "syscall_latency"))
        stats = probe.stats()["syscall_latency"]
    rows = np.concatenate(parts)
    mine = rows[(rows["cgroup_id"] == cgid) & (rows["nr"] == NR_GETPPID)]
    assert len(mine) >= 5, f"the loop should span several intervals ({flips} flips)"
    assert calls >= n and mine["count"].sum() == calls
    assert rows["count"].sum() == stats["emitted"] - stats["dropped"]


def test_a_full_histogram_map_counts_drops(bpf_dir: Path) -> None:
    """With room for 2 keys, samples of further (cgroup, syscall) keys are dropped, counted."""
    with loaded("syscall_latency", bpf_dir, histogram_max_keys=2) as (probe, reader):
        for call in (os.getppid, os.getpid, os.getuid, os.getgid):
            call()
        probe.detach()
        collect([reader])
        rows = rows_of(reader, "syscall_latency")
        stats = probe.stats()["syscall_latency"]
    assert stats["dropped"] > 0
    assert rows["count"].sum() == stats["emitted"] - stats["dropped"]


def test_pid_filter_keeps_one_process(bpf_dir: Path) -> None:
    wait_then_call = "import os, sys; sys.stdin.read(); [os.getppid() for _ in range(100)]"
    with new_cgroup("pid") as (cg_in, in_id), new_cgroup("other") as (cg_out, out_id):
        target = run_in(cg_in, wait_then_call, stdin=True)  # the filter is set at load: start first
        with loaded("syscall_latency", bpf_dir, filter_pid=target.pid) as (probe, reader):
            other = run_in(cg_out, wait_then_call, stdin=True)
            other.communicate("")
            target.communicate("")
            assert target.returncode == other.returncode == 0
            probe.detach()
            collect([reader])
            rows = rows_of(reader, "syscall_latency")
    assert set(rows["cgroup_id"].tolist()) == {in_id}
    assert rows[rows["nr"] == NR_GETPPID]["count"].sum() == 100
    assert out_id not in rows["cgroup_id"]


# --- runqueue_latency ---------------------------------------------------------------------

SLEEPER = """
import time
for _ in range(200):
    time.sleep(0.001)
"""
SPINNER = """
import time
end = time.monotonic() + float(__import__("sys").argv[1])
while time.monotonic() < end:
    pass
"""


def test_runqueue_waits_per_cgroup(bpf_dir: Path) -> None:
    spinners = 2 * os.cpu_count()  # more runnable threads than CPUs: they queue
    with (
        new_cgroup("busy") as (busy, busy_id),
        new_cgroup("sleepy") as (sleepy, sleepy_id),
        loaded("runqueue_latency", bpf_dir) as (probe, reader),
    ):
        procs = [run_in(busy, SPINNER, "1.0") for _ in range(spinners)]
        sleeper = run_in(sleepy, SLEEPER)
        assert all(p.wait() == 0 for p in procs) and sleeper.wait() == 0
        probe.detach()
        collect([reader])
        rows = rows_of(reader, "runqueue_latency")
        stats = probe.stats()["runqueue_latency"]
    assert rows["count"].sum() == stats["emitted"] - stats["dropped"] and stats["dropped"] == 0
    busy_rows, sleepy_rows = rows[rows["cgroup_id"] == busy_id], rows[rows["cgroup_id"] == sleepy_id]
    # every wakeup from a 1 ms sleep is one wait; the shell and exec add a few more
    assert sleepy_rows["count"].sum() >= 200
    # spinners preempt each other for a second: many waits, typically a time slice long
    waits, waited = int(busy_rows["count"].sum()), int(busy_rows["sum_ns"].sum())
    assert waits >= 50
    hist = busy_rows["buckets"].sum(axis=0)
    median = int(np.searchsorted(np.cumsum(hist), waits / 2))
    assert 10 <= median <= 30, f"median wait bucket 2^{median} ns is implausible: {hist.tolist()}"
    # spinners wanted spinners x 1 s of CPU on cpu_count CPUs: they waited about half of it
    assert 0.2 * spinners * 1e9 / 2 < waited < 2 * spinners * 1e9


# --- block_io_latency ---------------------------------------------------------------------


def disk_of(path: Path) -> tuple[str, bool]:
    """The disk a file lives on (its kernel name) and whether it has a volatile write cache."""
    dev = os.stat(path).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if os.major(dev) == 0 or not sysfs.exists():
        require_real(f"block_io_latency: {path} is not on a block device (major {os.major(dev)})")
    disk = sysfs.resolve()
    if (disk / "partition").exists():
        disk = disk.parent
    cache = (disk / "queue" / "write_cache").read_text().strip() if (disk / "queue").exists() else ""
    return disk.name, cache == "write back"


def test_block_requests_per_disk_and_operation(bpf_dir: Path, tmp_path: Path) -> None:
    disk, write_back = disk_of(tmp_path)
    n, block = 64, 4096
    target = tmp_path / "direct.bin"
    buf = np.full(block, 0x5A, np.uint8)
    aligned = np.frombuffer(memoryview(bytearray(2 * block)), np.uint8)
    start = (-aligned.ctypes.data) % block  # O_DIRECT wants an aligned buffer
    page = aligned[start : start + block]
    page[:] = buf
    with loaded("block_io_latency", bpf_dir) as (probe, reader):
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        try:
            for i in range(n):  # one request each: synchronous, not adjacent in time
                assert os.pwritev(fd, [page], 2 * i * block) == block
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            for i in range(n):
                assert os.preadv(fd, [page], 2 * i * block) == block
        finally:
            os.close(fd)
        probe.detach()
        collect([reader])
        rows = rows_of(reader, "block_io_latency")
        stats = probe.stats()["block_io_latency"]
    from node_agent.probes.block_io_latency import columns

    cols = columns(rows, 0)
    on_disk = cols["device"] == disk.encode()
    counts = {
        op.decode(): int(rows["count"][on_disk & (cols["operation"] == op)].sum())
        for op in np.unique(cols["operation"])
    }
    assert counts.get("write", 0) >= n and counts.get("read", 0) >= n, counts
    if write_back:  # fsync on a volatile cache flushes it
        assert counts.get("flush", 0) >= 1, counts
    reads = rows[on_disk & (cols["operation"] == b"read")]
    assert (reads["sum_ns"] / reads["count"] > 1000).all()  # a device round trip is > 1 us
    assert rows["count"].sum() == stats["emitted"] - stats["dropped"]


# --- object and layers agree ------------------------------------------------------------------


@pytest.mark.parametrize("name", HISTOGRAM_PROBES)
def test_btf_proto_and_table_agree(name: str, bpf_dir: Path) -> None:
    probe = get_probe(name)
    (hist,) = probe.histograms
    btf = BpfObject.open(bpf_dir / probe.object_file).btf
    slots = btf.struct_dtype("hist")["slots"].shape[0]
    schema = {c.name: c for c in SCHEMAS[hist.name].columns}
    assert schema["buckets"].per_row == slots == 32
    assert btf.struct_size(hist.key) == btf.struct_dtype(hist.key).itemsize
    migrations = REPO / "infra/clickhouse/migrations"
    created = next(migrations.glob(f"*_{hist.name}.sql")).read_text()
    own = {n for n, c in schema.items() if not c.omittable}  # later ones: the agent's extras
    assert set(re.findall(r"^\s+`(\w+)`", created, re.MULTILINE)) == own | {"node"}
    added = "".join(m.read_text() for m in migrations.glob("*.sql") if f"TABLE fleet.{hist.name}\n" in m.read_text())
    assert all(f"`{n}`" in added for n in set(schema) - own)
    rows = np.zeros(3, row_dtype(btf.struct_dtype(hist.key), slots))
    assert set(hist.columns(rows, 0)) == own  # the workload columns are added by the agent


# --- classic tracepoint twins (for tracepoint-only loaders) --------------------------------

CLASSIC = r"""
import dataclasses, json, os, sys
from pathlib import Path
import numpy as np
from fleetscope.config import AgentOptions
from node_agent.histogram import collect, take
from node_agent.loader import load_probe
from node_agent.probes import get_probe

def classic_first(name):
    probe = get_probe(name)
    hooks = tuple(dataclasses.replace(h, programs=h.programs[::-1]) for h in probe.hooks)
    return dataclasses.replace(probe, hooks=hooks)

out = {}
settings = AgentOptions(bpf_dir=Path(sys.argv[1]))
with load_probe(classic_first("syscall_latency"), settings) as p:
    attached = p.attached
    for _ in range(777):
        os.getppid()
    p.detach(); collect([p.histograms])
    rows = np.concatenate([r for _, r in take([p.histograms])])
    me = rows[(rows["nr"] == 110) & (rows["cgroup_id"] == int(sys.argv[2]))]
    out["syscall"] = {"attached": attached, "getppid": int(me["count"].sum())}
with load_probe(classic_first("block_io_latency"), settings) as p:
    attached = p.attached
    fd = os.open(sys.argv[3], os.O_RDWR | os.O_CREAT, 0o600)
    for i in range(16):
        os.pwrite(fd, b"x" * 4096, i * 8192); os.fsync(fd)
    os.close(fd)
    p.detach(); collect([p.histograms])
    rows = np.concatenate([r for _, r in take([p.histograms])])
    out["block"] = {"attached": attached, "ops": sorted(set(rows["op"].tolist())),
                    "count": int(rows["count"].sum()), "stats": p.stats()["block_io_latency"]}
print(json.dumps(out))
"""


def test_classic_tracepoint_twins_measure_the_same(bpf_dir: Path, tmp_path: Path) -> None:
    """Run where tracefs is mounted (a private mount namespace), classic programs first."""
    script = tmp_path / "classic.py"
    script.write_text(CLASSIC)
    me = next(ln.split("::", 1)[1] for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::"))
    cgid = os.stat(cgroup2_mount() / me.lstrip("/")).st_ino
    result = run_in_private_tracefs(
        [sys.executable, str(script), str(bpf_dir), str(cgid), str(tmp_path / "classic.bin")],
        "histogram probes",
        timeout=120,
    )
    assert set(result["syscall"]["attached"].values()) == {
        "tracepoint__raw_syscalls__sys_enter",
        "tracepoint__raw_syscalls__sys_exit",
    }
    assert result["syscall"]["getppid"] == 777
    block = result["block"]
    assert set(block["attached"].values()) == {
        "tracepoint__block__block_rq_issue",
        "tracepoint__block__block_rq_complete",
    }
    assert 1 in block["ops"] and block["count"] >= 16  # writes, keyed by (dev, sector)
    assert block["count"] == block["stats"]["emitted"] - block["stats"]["dropped"]


# --- the whole path: agent -> batches -> ClickHouse -> the README's queries -----------------


def readme_query(stream: str) -> str:
    """The README's p50/p99 example for a histogram table, without its LIMIT."""
    readme = (REPO / "README.md").read_text()
    m = re.search(rf"```sql\n-- p50/p99 per workload: {stream}\n(.*?)```", readme, re.DOTALL)
    assert m, f"README.md has no p50/p99 example for {stream}"
    return re.sub(r"\s*LIMIT \d+;?\s*$", "", m.group(1).strip()).rstrip(";")


def query(data_dir: Path, sql: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "fleetscope", "query", "--data-dir", str(data_dir), "--format", "json", sql],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in out.stdout.splitlines()]


def histogram_reads(port: int, stream: str) -> int:
    """The agent's records_read of a histogram stream (/status): it grows at every interval's end."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30) as resp:
        return int(json.load(resp)["streams"].get(stream, {}).get("records_read", 0))


def wait_for_interval_ends(run: FleetscopeProcess, port: int, stream: str, ends: int, timeout: float = 60) -> None:
    """Until the agent has ended `ends` more intervals of stream (it is always busy, so every
    interval has rows) than when called."""
    deadline, last, seen = time.monotonic() + timeout, -1, -1
    while seen < ends:
        assert time.monotonic() < deadline, f"{seen} of {ends} interval ends in {timeout}s:\n{run.log_text()[-3000:]}"
        assert run.proc is not None and run.proc.poll() is None, run.log_text()[-3000:]
        try:
            now = histogram_reads(port, stream)
        except OSError:  # not serving yet, or busy past the timeout: ask again
            now = last
        if last < 0 <= now:
            seen = 0
        elif now > last >= 0:
            seen += 1
        last = max(last, now)
        time.sleep(0.1)


def slot_top_us(ns: int) -> float:
    """The upper edge of the slot of a duration, in µs: what the README's quantiles (linear
    inside the slot of the sample they pick) can at most read for a sample <= ns."""
    return (1 << (slot(ns) + 1)) / 1e3


def quantile_bound_us(walls: list[int], q: float) -> float:
    """The README's q quantile picks the sample of rank ceil(q * calls). Each call's kernel time
    is <= its wrapper's, so the k-th shortest kernel time is <= the k-th shortest wrapper's."""
    return slot_top_us(sorted(walls)[math.ceil(q * len(walls)) - 1])


def test_histograms_reach_clickhouse_and_the_readme_queries_work(bpf_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    n, sleeps = 3000, 100
    port = free_port()
    run = FleetscopeProcess(
        "run", "--data-dir", str(data_dir), "--bpf-dir", str(bpf_dir), "--status", "log",
        "--probes", ",".join(HISTOGRAM_PROBES), "--histogram-interval", "1s", "--status-listen", f"127.0.0.1:{port}",
        log=tmp_path / "run.log",
    )  # fmt: skip
    with new_cgroup("e2e") as (cgroup, cgid), run:
        run.wait_for_log("probe runqueue_latency running", 120)
        child = run_in(cgroup, SYSCALLS, str(n), str(sleeps), stdout=True)  # ~0.2 s: spans 1 s intervals
        out, _ = child.communicate()
        assert child.returncode == 0
        walls = json.loads(out)
        target = tmp_path / "e2e.bin"
        with open(target, "wb") as f:
            for _ in range(8):
                f.write(os.urandom(1 << 16))
                f.flush()
                os.fsync(f.fileno())
        # at least one interval ends with the workload in it. The agent flips an interval, then
        # reads it (records_read grows): a read seen from now on may be of a flip before now,
        # the next one is of an interval that ended after now, so after the workload
        wait_for_interval_ends(run, port, "syscall_latency", 2)
        run.stop(signal.SIGINT)
    assert run.returncode == 0, run.log_text()[-3000:]

    syscalls = {r["syscall"]: r for r in query(data_dir, readme_query("syscall_latency")) if r["cgroup_id"] == cgid}
    assert syscalls["getppid"]["calls"] == n
    sleep = syscalls["clock_nanosleep"]
    assert sleep["calls"] == sleeps
    # each sleep's kernel time lies between the 1.5 ms asked ([2^20, 2^21) ns) and its wrapper's
    # wall time (idle: the 1.5 ms slot too), so the quantiles' slots do
    sleeps_ns = walls["sleeps_ns"]
    assert 1048.576 <= sleep["p50_us"] <= quantile_bound_us(sleeps_ns, 0.5), sorted(sleeps_ns)
    assert sleep["p50_us"] <= sleep["p99_us"] <= quantile_bound_us(sleeps_ns, 0.99), sorted(sleeps_ns)
    assert 1500 <= sleep["avg_us"] <= sum(sleeps_ns) / sleeps / 1e3 + 0.05  # avg_us is rounded to 0.1
    # sub-µs getppid reads > 0 (hence 3 decimals). The n kernel times sum to <= the loop's wall
    # time W, so at most half of them are >= 2W/n: the median (rank n/2) is below that
    assert 0 < syscalls["getppid"]["p50_us"] <= slot_top_us(2 * walls["getppid_ns"] // n), walls["getppid_ns"]

    runq = {r["cgroup_id"]: r for r in query(data_dir, readme_query("runqueue_latency"))}
    assert runq[cgid]["waits"] >= sleeps  # each wakeup from a sleep waited, if only briefly
    assert 0 <= runq[cgid]["p50_us"] <= runq[cgid]["p99_us"] < 1e6

    disk, _ = disk_of(tmp_path)
    block = [r for r in query(data_dir, readme_query("block_io_latency")) if r["device"] == disk]
    writes = [r for r in block if r["operation"] == "write"]
    assert writes and writes[0]["requests"] >= 8
    assert 0 < writes[0]["p50_us"] <= writes[0]["p99_us"] < 10e6

    # rows per interval, the wire path intact, and the loss accounting's definitions hold:
    # kernel emitted - dropped (samples) == sum(count) of the stored rows
    tables = " UNION ALL ".join(
        f"SELECT '{s}' AS stream, sum(count) AS samples, count() AS rows, uniqExact(time) AS intervals FROM fleet.{s}"
        for s in HISTOGRAM_PROBES
    )
    accounting = query(
        data_dir,
        f"SELECT t.stream AS stream, t.samples AS samples, t.rows AS rows, t.intervals AS intervals, "
        "k.emitted AS emitted, k.dropped AS dropped, k.read AS read "
        f"FROM ({tables}) AS t INNER JOIN (SELECT stream, "
        "sumIf(value, stage = 'kernel' AND counter = 'emitted') AS emitted, "
        "sumIf(value, stage = 'kernel' AND counter = 'dropped') AS dropped, "
        "sumIf(value, stage = 'agent' AND counter = 'records_read') AS read "
        "FROM fleet.pipeline_stats GROUP BY stream) AS k ON k.stream = t.stream",
    )
    assert sorted(r["stream"] for r in accounting) == sorted(HISTOGRAM_PROBES)
    for r in accounting:
        assert int(r["samples"]) == int(r["emitted"]) - int(r["dropped"]), r
        assert int(r["rows"]) == int(r["read"]) and int(r["intervals"]) >= 1, r
        if r["stream"] == "syscall_latency":  # always busy: rows every 1 s interval
            assert int(r["intervals"]) >= 2, r
