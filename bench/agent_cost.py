"""Agent cost per event beside the kernel-side cost, measured in the same run.

Runs `fleetscope agent` against a real Kafka broker, drives a storm with the C generator
(bench/storm.c) and measures, per repetition, over the storm plus the tail the agent
needs to drain and ship (batch age 1 s):

- events: records the probe emitted in the kernel (its per-CPU stream_stats, read from the
  agent's own maps), and how many of them found the ring full (dropped);
- kernel side: run_time_ns of the agent's BPF programs (BPF_ENABLE_STATS, from the agent's
  prog fds) / events, and per program run (run_time_ns / run_cnt). For file_open the
  program is raw_tp/sys_exit, which runs on every syscall of the machine (tracefs is not
  mounted, so the per-syscall classic tracepoints cannot attach) and filters: ns/event
  includes the runs that filtered other syscalls out, ns/run does not;
- user space: the agent process's CPU time (utime + stime, all threads) / records it read
  (emitted - dropped);
- the storm generator's and the Kafka broker's CPU, which compete for the same cores.

Storms: processes (fork+exec of a static binary: an exec and an exit row each), tcp
(loopback connect/accept/close: a connect and an accept row each), file_open at 100k
opens/s and unthrottled (open+close of a tmpfs file, --file-open-all), and failed opens of
a missing path at 100k/s with the default capture (failures and /etc/). On 2 CPUs only
the file_open storms reach 100k events/s: exec and connect cost the generator far more
CPU per event than the probes do, and it competes with the agent and the broker.

Each storm runs --repeat times in one agent; the report gives the median and each value.

Usage (root): .venv/bin/python bench/agent_cost.py
              [--storms processes,tcp,file_open_100k,file_open_max,file_open_fail_100k]
              [--seconds 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    RESULTS,
    Broker,
    agent,
    bpf_stats,
    count_delta,
    cpu_seconds,
    header,
    median,
    program_delta,
    programs,
    run_storm,
    status_mib,
    stream_counts,
)

OPEN_FILE = "/dev/shm/fsbench-open"


@dataclass(frozen=True)
class Storm:
    name: str
    probes: tuple[str, ...]
    mode: str  # storm.c mode
    workers: int
    rate: float  # storm.c operations/s (0: unthrottled)
    arg: str = ""
    extra: tuple[str, ...] = ()


STORMS = {
    "processes": Storm("processes", ("process",), "exec", 2, 0),
    "tcp": Storm("tcp", ("tcp_connections",), "tcp", 2, 0),
    "file_open_100k": Storm(
        "file_open_100k", ("file_open",), "open", 1, 100_000, OPEN_FILE, ("--file-open-all", "true")
    ),
    "file_open_max": Storm("file_open_max", ("file_open",), "open", 1, 0, OPEN_FILE, ("--file-open-all", "true")),
    "file_open_fail_100k": Storm("file_open_fail_100k", ("file_open",), "openfail", 1, 100_000, "/nonexistent/fsbench"),
}


@dataclass
class Sample:
    seconds: float
    events: int
    dropped: int
    kernel_ns: int
    runs: int
    agent_cpu: float
    storm_cpu: float
    broker_cpu: float
    storm_rate: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def kernel_per_event(self) -> float:
        return self.kernel_ns / max(self.events, 1)

    @property
    def kernel_per_run(self) -> float:
        return self.kernel_ns / max(self.runs, 1)

    @property
    def agent_per_event(self) -> float:
        """Agent CPU per record it read (emitted - dropped)."""
        return self.agent_cpu * 1e9 / max(self.events - self.dropped, 1)

    @property
    def ratio(self) -> float:
        return self.agent_per_event / max(self.kernel_per_event, 1e-9)


def measure(pid: int, broker_pid: int | None, storm: Storm, seconds: float) -> Sample:
    s0, p0, c0, b0 = stream_counts(pid), programs(pid), cpu_seconds(pid), broker_cpu(broker_pid)
    r = run_storm(storm.mode, seconds, storm.workers, storm.rate, storm.arg)
    time.sleep(1.6)  # the agent drains the rings and ships the tail (batch age 1 s, tick 0.1 s)
    s1, p1, c1, b1 = stream_counts(pid), programs(pid), cpu_seconds(pid), broker_cpu(broker_pid)
    events, dropped = count_delta(s0, s1)
    kernel_ns, runs = program_delta(p0, p1)
    # events/s over the storm itself (the tail has none of the storm's events)
    return Sample(r.seconds, events, dropped, kernel_ns, runs, c1 - c0, r.cpu, b1 - b0, r.rate)


def broker_cpu(pid: int | None) -> float:
    return cpu_seconds(pid) if pid else 0.0


def run(broker: Broker, storm: Storm, seconds: float, repeat: int) -> tuple[list[Sample], float]:
    if storm.mode == "open":
        Path(OPEN_FILE).write_bytes(b"")
    with agent(broker, storm.probes, *storm.extra, tag=storm.name) as proc:
        assert proc.proc is not None
        pid = proc.proc.pid
        samples = [measure(pid, broker.broker.pid, storm, seconds) for _ in range(repeat)]
        hwm = status_mib(pid, "VmHWM")
    return samples, hwm


def report(storm: Storm, samples: list[Sample], hwm: float) -> list[str]:
    def m(f: str) -> float:
        return median([getattr(s, f) for s in samples])

    def each(f: str, fmt: str) -> str:
        return ", ".join(format(getattr(s, f), fmt) for s in samples)

    rate = f"{storm.rate:,.0f} ops/s target" if storm.rate else "unthrottled"
    cpus = os.cpu_count() or 1
    return [
        f"== {storm.name}: probes {','.join(storm.probes)} {' '.join(storm.extra)}; "
        f"storm {storm.mode} x{storm.workers} workers, {rate}",
        f"events/s (kernel emitted):   {m('events_per_s'):>10,.0f}   [{each('events_per_s', ',.0f')}]",
        f"events per run:              {m('events'):>10,.0f}   dropped (ring full): [{each('dropped', 'd')}]",
        f"kernel ns/event:             {m('kernel_per_event'):>10,.0f}   [{each('kernel_per_event', '.0f')}]"
        f"   (ns/program run: {m('kernel_per_run'):.0f})",
        f"agent user-space ns/event:   {m('agent_per_event'):>10,.0f}   [{each('agent_per_event', '.0f')}]",
        f"ratio agent/kernel:          {m('ratio'):>10.2f}x  [{each('ratio', '.2f')}]",
        f"CPU s per run: agent {m('agent_cpu'):.2f}, storm generator {m('storm_cpu'):.2f}, "
        f"kafka broker {m('broker_cpu'):.2f} (of {cpus * m('seconds'):.0f} core-s in the storm on {cpus} cpus)",
        f"agent peak RSS (VmHWM): {hwm:.0f} MiB",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storms", default="processes,tcp,file_open_100k,file_open_max,file_open_fail_100k")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "agent_cost.txt"))
    a = ap.parse_args()
    lines = [header(), f"each storm: {a.seconds:.0f} s, {a.repeat} runs in one agent; median [each run]"]
    with Broker() as broker, bpf_stats():
        for name in a.storms.split(","):
            samples, hwm = run(broker, STORMS[name], a.seconds, a.repeat)
            block = report(STORMS[name], samples, hwm)
            print("\n".join(block), flush=True)
            lines += block
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
