"""Shared pieces of the agent benchmarks: storm generator, BPF run-time statistics,
per-process CPU and memory, and a `fleetscope agent` against a real Kafka broker.

Measurements are attributed by process, never by program name: the BPF programs and maps
of a process are the `anon_inode:bpf-prog` / `bpf-map` fds in /proc/<pid>/fd, whose
fdinfo carries run_time_ns and run_cnt. Other work on the machine (other engineers'
probes, another agent) does not leak into the figures that way.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.kafka_broker import KafkaBroker  # noqa: E402
from tests.support.procs import FleetscopeProcess  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BUILD = ROOT / ".cache" / "bench"
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BPF_STATS_RUN_TIME = 0
ALL_PROBES = (
    "process", "tcp_connections", "file_open", "oom_kills", "fatal_signals",
    "syscall_latency", "block_io_latency", "runqueue_latency",
)  # fmt: skip

# the exec storm's child: a static binary that exits at once (no ld.so, no libc start-up)
TRUE_C = 'void _start(void) { __asm__ volatile("mov $60, %eax\\n xor %edi, %edi\\n syscall"); }\n'


def header() -> str:
    load = os.getloadavg()
    return (
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus: {os.cpu_count()}  kernel: {os.uname().release}  "
        f"load before: {load[0]:.2f}"
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# --- tools -----------------------------------------------------------------------------


def build_tools() -> tuple[Path, Path]:
    """Compile bench/storm.c and the static `true` (cached in .cache/bench)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    storm, true = BUILD / "storm", BUILD / "fsbench-true"
    src = ROOT / "bench" / "storm.c"
    if not storm.exists() or storm.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-o", storm, src], check=True)
    if not true.exists():
        (BUILD / "true.c").write_text(TRUE_C)
        subprocess.run(["cc", "-O2", "-static", "-nostdlib", "-o", true, BUILD / "true.c"], check=True)
    return storm, true


@dataclass
class StormResult:
    ops: int  # operations done (execs, connections, opens)
    seconds: float
    cpu: float  # CPU seconds of the generator and everything it waited for

    @property
    def rate(self) -> float:
        return self.ops / self.seconds


def run_storm(mode: str, seconds: float, workers: int, rate: float = 0, arg: str = "") -> StormResult:
    """Run the C storm generator to completion; its CPU comes from wait4's rusage."""
    storm, true = build_tools()
    if mode == "exec" and not arg:
        arg = str(true)
    p = subprocess.Popen([storm, mode, str(seconds), str(workers), str(rate), arg], stdout=subprocess.PIPE)
    assert p.stdout is not None
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"storm {mode} exited {p.returncode}")
    ops, secs = out.split()
    return StormResult(int(ops), float(secs), ru.ru_utime + ru.ru_stime)


# --- BPF statistics --------------------------------------------------------------------


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """BPF run-time statistics on for the block, through BPF_ENABLE_STATS: refcounted,
    held by an fd of this process, off again when it is closed (or this process dies).
    kernel.bpf_stats_enabled is not written; it is checked to be unchanged afterwards."""
    before = STATS_SYSCTL.read_text().strip()
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    fd = int(lib.bpf_enable_stats(BPF_STATS_RUN_TIME))
    if fd < 0:
        raise OSError(-fd, "bpf_enable_stats(BPF_STATS_RUN_TIME) failed")
    try:
        yield
    finally:
        os.close(fd)
        after = STATS_SYSCTL.read_text().strip()
        assert after == before, f"kernel.bpf_stats_enabled changed from {before} to {after}"


def _fdinfo(pid: int, kind: str) -> list[dict[str, str]]:
    """fdinfo of a process's fds of anon_inode:<kind> (bpf-prog, bpf-map)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != f"anon_inode:{kind}":
                continue
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        out.append(dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line))
    return out


def programs(pid: int) -> dict[int, tuple[int, int]]:
    """prog id -> (run_time_ns, run_cnt) of the BPF programs process pid holds."""
    progs = {}
    for info in _fdinfo(pid, "bpf-prog"):
        progs[int(info["prog_id"])] = (int(info["run_time_ns"]), int(info["run_cnt"]))
    return progs


def program_names(ids: Sequence[int]) -> dict[int, str]:
    names = {}
    for i in ids:
        out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(i)], capture_output=True, text=True)
        names[i] = json.loads(out.stdout).get("name", "?") if out.returncode == 0 else "?"
    return names


def program_delta(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over programs between two snapshots."""
    t = sum(v[0] - before.get(k, (0, 0))[0] for k, v in after.items())
    c = sum(v[1] - before.get(k, (0, 0))[1] for k, v in after.items())
    return t, c


def stream_counts(pid: int) -> dict[str, tuple[int, int]]:
    """Per-CPU `<probe>_stats` maps (struct stream_stats per stream) of process pid, summed:
    "<map>[<slot>]" -> (emitted, dropped)."""
    out: dict[str, tuple[int, int]] = {}
    for info in _fdinfo(pid, "bpf-map"):
        if info.get("map_type", "").strip() != "6":  # BPF_MAP_TYPE_PERCPU_ARRAY
            continue
        map_id = info["map_id"].strip()
        dump = subprocess.run(["bpftool", "-j", "map", "dump", "id", map_id], capture_output=True, text=True)
        show = subprocess.run(["bpftool", "-j", "map", "show", "id", map_id], capture_output=True, text=True)
        if dump.returncode or show.returncode:
            continue
        name = json.loads(show.stdout).get("name", map_id)
        for entry in json.loads(dump.stdout):
            f = entry.get("formatted")
            if not f or not isinstance(f["values"][0]["value"], dict) or "emitted" not in f["values"][0]["value"]:
                continue
            e = sum(v["value"]["emitted"] for v in f["values"])
            d = sum(v["value"]["dropped"] for v in f["values"])
            out[f"{name}[{f['key']}]"] = (e, d)
    return out


def count_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> tuple[int, int]:
    e = sum(v[0] - before.get(k, (0, 0))[0] for k, v in after.items())
    d = sum(v[1] - before.get(k, (0, 0))[1] for k, v in after.items())
    return e, d


# --- processes -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12)) / CLK_TCK


def status_mib(pid: int, key: str) -> float:
    """A kB figure of /proc/<pid>/status (VmHWM, VmRSS, RssAnon, RssFile, RssShmem) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --- the agent under test --------------------------------------------------------------


class Broker:
    """One Kafka broker for all runs of a benchmark (its JVM is not what is measured); its
    directory (data, agent logs and spools) is removed afterwards unless FSBENCH_KEEP is set."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="fsbench-"))
        self.broker = KafkaBroker(self.tmp / "kafka", ROOT / ".cache" / "kafka" / "libs")

    def __enter__(self) -> Broker:
        self.broker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.broker.stop()
        if not os.environ.get("FSBENCH_KEEP"):  # the broker's data, agent logs and spools
            shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap


@contextlib.contextmanager
def agent(
    broker: Broker, probes: Sequence[str], *extra: str, tag: str = "agent", env: dict[str, str] | None = None
) -> Iterator[FleetscopeProcess]:
    """`fleetscope agent` with these probes, started and running; stopped (SIGTERM) after."""
    log = broker.tmp / f"{tag}-{time.monotonic_ns()}.log"
    proc = FleetscopeProcess(
        "agent", "--brokers", broker.bootstrap, "--probes", ",".join(probes), "--status-interval", "1h", *extra,
        log=log, env=env,
    )  # fmt: skip
    with proc:
        for p in probes:
            proc.wait_for_log(f"probe {p} ", 90)
        proc.wait_for_log("connected to kafka", 60)
        time.sleep(1.0)  # start-up work settles (imports, first metadata fetch)
        yield proc
        proc.stop()
