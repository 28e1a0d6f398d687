"""Kernel cost per event of the in-kernel histogram probes, and the agent's cost per interval.

Loads syscall_latency, block_io_latency and runqueue_latency, drives their hooks hard
(getppid in a tight loop; a pipe ping-pong between two processes, i.e. wakeups and
context switches; O_DIRECT block requests) and reports run_time_ns / run_cnt of each
program. Run-time statistics are switched on with BPF_ENABLE_STATS, the refcounted
equivalent of kernel.bpf_stats_enabled=1: on while this process holds the fd, back off
when it exits, and it cannot switch off another process's measurement.

Beside them run empty programs on sys_enter and sched_switch (compiled here with clang):
their run time is the floor of the measurement itself (the clock reads around each run,
tens of ns in a VM), to subtract.

Also measured: the agent side of an interval (collect(): flip, RCU grace period, batch
read and delete, per-CPU sum) and how many rows it yields.

Usage (root): .venv/bin/python bench/histogram_kernel_cost.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleetscope.config import AgentOptions  # noqa: E402
from node_agent.histogram import collect, take  # noqa: E402
from node_agent.libbpf import BpfObject  # noqa: E402
from node_agent.loader import LoadedProbe, load_probe  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "histogram_kernel_cost.txt"
FLOOR = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
SEC("raw_tp/sys_enter") int floor__sys_enter(void *ctx) { return 0; }
SEC("tp_btf/sched_switch") int floor__sched_switch(void *ctx) { return 0; }
char LICENSE[] SEC("license") = "GPL";
"""
BPF_STATS_RUN_TIME = 0

GETPPID = "import os, time\nend = time.monotonic() + {s}\nn = 0\nwhile time.monotonic() < end:\n" + (
    "    for _ in range(1000):\n        os.getppid()\n    n += 1000\nprint(n)"
)
PINGPONG = r"""
import os, time
a_r, a_w = os.pipe(); b_r, b_w = os.pipe()
end = time.monotonic() + {s}
if os.fork() == 0:
    os.close(a_w)
    while os.read(a_r, 1):
        os.write(b_w, b"x")
    os._exit(0)
os.close(a_r); os.close(b_w)
n = 0
while time.monotonic() < end:
    os.write(a_w, b"x"); os.read(b_r, 1); n += 1
os.close(a_w); os.wait(); print(n)
"""


def enable_stats() -> int:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    fd = int(lib.bpf_enable_stats(BPF_STATS_RUN_TIME))
    if fd < 0:
        raise OSError(-fd, "bpf_enable_stats(BPF_STATS_RUN_TIME) failed")
    return fd


def program_stats() -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt) of the BPF programs this process holds."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":\t", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines())
        except OSError:
            continue
        prog_id = info["prog_id"].strip()
        name = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", prog_id],
                                         capture_output=True, text=True, check=True).stdout)["name"]  # fmt: skip
        out[name] = (int(info["run_time_ns"]), int(info["run_cnt"]))
    return out


def block_storm(seconds: float, where: Path) -> int:
    page = 4096
    buf = bytearray(2 * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    view = memoryview(buf)[(-addr) % page :][:page]
    fd = os.open(where / "bench.bin", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    n, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            os.pwritev(fd, [view], (n % 256) * page)
            os.preadv(fd, [view], (n % 256) * page)
            n += 2
    finally:
        os.close(fd)
        os.unlink(where / "bench.bin")
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    stats_fd = enable_stats()
    settings = AgentOptions(bpf_dir=ROOT / "bpf")
    build = Path(tempfile.mkdtemp())
    (build / "floor.bpf.c").write_text(FLOOR)
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", "-I", str(ROOT / "bpf"), "-c", str(build / "floor.bpf.c"),
         "-o", str(build / "floor.bpf.o")], check=True,
    )  # fmt: skip
    floor = BpfObject.open(build / "floor.bpf.o")
    floor.load()
    floor.attach_all()
    probes: list[LoadedProbe] = [
        load_probe(name, settings) for name in ("syscall_latency", "block_io_latency", "runqueue_latency")
    ]
    lines = [f"# {time.strftime('%Y-%m-%d %H:%M:%S')} kernel {os.uname().release}, {os.cpu_count()} CPUs"]
    try:
        workloads = {
            "getppid loop": [sys.executable, "-c", GETPPID.format(s=args.seconds)],
            "pipe ping-pong": [sys.executable, "-c", PINGPONG.format(s=args.seconds)],
        }
        for label, argv in workloads.items():
            before = program_stats()
            t = time.perf_counter()
            done = int(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
            wall = time.perf_counter() - t
            after = program_stats()
            lines.append(f"\n## {label}: {done} iterations in {wall:.2f}s")
            for name in sorted(after):
                ns, cnt = (a - b for a, b in zip(after[name], before.get(name, (0, 0)), strict=True))
                if cnt:
                    lines.append(f"{name:28s} run_cnt {cnt:>10d}  {ns / cnt:7.1f} ns/event  ({cnt / wall:,.0f}/s)")
        before = program_stats()
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            t = time.perf_counter()
            done = block_storm(args.seconds, Path(tmp))
            wall = time.perf_counter() - t
        after = program_stats()
        lines.append(f"\n## O_DIRECT 4 KiB write+read: {done} requests in {wall:.2f}s")
        for name in sorted(after):
            ns, cnt = (a - b for a, b in zip(after[name], before.get(name, (0, 0)), strict=True))
            if cnt and "block" in name:
                lines.append(f"{name:28s} run_cnt {cnt:>10d}  {ns / cnt:7.1f} ns/event  ({cnt / wall:,.0f}/s)")
        readers = [p.histograms for p in probes if p.histograms is not None]
        lines.append("\n## agent side of one interval (collect: flip, RCU grace period, batch read + delete)")
        for _ in range(3):
            time.sleep(1.0)
            cpu, t = time.process_time(), time.perf_counter()
            collect(readers)
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            rows = {s: len(r) for s, r in take(readers)}
            lines.append(f"collect: {wall * 1e3:6.1f} ms wall, {cpu * 1e3:5.2f} ms CPU; rows {rows}")
    finally:
        for p in probes:
            p.close()
        floor.close()
        os.close(stats_fd)
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
