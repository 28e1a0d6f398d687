"""Agent memory with every probe on, under a mixed storm: peak RSS (VmHWM) and what it is made of.

Runs `fleetscope agent --probes <all>` (probes that do not load are listed; the agent runs
without them) against a real Kafka broker and drives, at the same time, for --seconds:

- file_open: open+close of a tmpfs file with --file-open-all, at --open-rate (0: unthrottled);
- processes: fork+exec of a static binary (an exec and an exit row each), at --exec-rate;
- tcp: loopback connect/accept/close (two rows each), at --tcp-rate;

while the histogram probes count every syscall, context switch and block request. Reports
ring-buffer events/s (kernel emitted, all event streams), histogram samples/s, the agent's
VmHWM and, sampled every 0.2 s, VmRSS split into RssAnon (Python heap, numpy arrays),
RssFile (shared libraries and the ring buffers' double-mapped data pages) and RssShmem.
The ring buffers hold ring_bytes (default 2 MiB) per stream, mapped twice, so each ring
can add up to 2 x ring_bytes to RSS once the kernel has written all of it.

Each scenario runs --repeat times, each in a fresh agent (VmHWM is a process's peak).

Usage (root): .venv/bin/python bench/agent_memory.py [--scenarios 100k,max] [--seconds 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    ALL_PROBES,
    RESULTS,
    Broker,
    agent,
    count_delta,
    header,
    median,
    run_storm,
    status_mib,
    stream_counts,
)

OPEN_FILE = "/dev/shm/fsbench-open"
SCENARIOS = {  # (open ops/s, exec ops/s, tcp connections/s); 0: unthrottled
    "100k": (85_000, 2_500, 2_500),  # ~85k + 5k + 5k ring events/s
    "max": (0, 0, 0),
}


@dataclass
class MemSample:
    events: int
    dropped: int
    samples: int
    seconds: float
    hwm: float
    peak_anon: float
    peak_file: float
    idle_rss: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


def split(counts: dict[str, tuple[int, int]]) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Ring-buffer streams and in-kernel histogram streams (whose counters count samples)."""
    hist = {k: v for k, v in counts.items() if "latency" in k}
    return {k: v for k, v in counts.items() if k not in hist}, hist


def run(
    broker: Broker, rates: tuple[int, int, int], seconds: float, env: dict[str, str] | None = None
) -> tuple[MemSample, list[str]]:
    Path(OPEN_FILE).write_bytes(b"")
    with agent(broker, ALL_PROBES, "--file-open-all", "true", tag="memory", env=env) as proc:
        assert proc.proc is not None
        pid = proc.proc.pid
        log = proc.log_text()
        running = [p for p in ALL_PROBES if f"probe {p} running" in log]
        idle = status_mib(pid, "VmRSS")
        c0 = stream_counts(pid)
        t0 = time.monotonic()
        open_rate, exec_rate, tcp_rate = rates
        storms = [
            threading.Thread(target=run_storm, args=("open", seconds, 1, open_rate, OPEN_FILE)),
            threading.Thread(target=run_storm, args=("exec", seconds, 1, exec_rate)),
            threading.Thread(target=run_storm, args=("tcp", seconds, 1, tcp_rate)),
        ]
        for t in storms:
            t.start()
        peak_anon = peak_file = 0.0
        while any(t.is_alive() for t in storms) or time.monotonic() - t0 < seconds + 1.6:
            peak_anon = max(peak_anon, status_mib(pid, "RssAnon"))
            peak_file = max(peak_file, status_mib(pid, "RssFile"))
            time.sleep(0.2)
        for t in storms:
            t.join()
        c1 = stream_counts(pid)
        ring0, hist0 = split(c0)
        ring1, hist1 = split(c1)
        events, dropped = count_delta(ring0, ring1)
        samples, _ = count_delta(hist0, hist1)
        hwm = status_mib(pid, "VmHWM")
    return MemSample(events, dropped, samples, seconds, hwm, peak_anon, peak_file, idle), running


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", default="100k,max")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the agent (e.g. malloc tunables)")
    ap.add_argument("--out", default=str(RESULTS / "agent_memory.txt"))
    a = ap.parse_args()
    env = dict(e.split("=", 1) for e in a.env)
    lines = [header() + (f"  agent env: {' '.join(a.env)}" if a.env else "")]
    with Broker() as broker:
        for name in a.scenarios.split(","):
            rates = SCENARIOS[name]
            runs = [run(broker, rates, a.seconds, env) for _ in range(a.repeat)]
            samples = [r[0] for r in runs]
            running = runs[0][1]
            missing = [p for p in ALL_PROBES if p not in running]

            def m(f: str, s: list[MemSample] = samples) -> float:
                return median([getattr(x, f) for x in s])

            def each(f: str, fmt: str, s: list[MemSample] = samples) -> str:
                return ", ".join(format(getattr(x, f), fmt) for x in s)

            target = ", ".join(f"{r:,}/s" if r else "unthrottled" for r in rates)
            block = [
                f"== {name}: storms open, exec, tcp at {target}; {a.seconds:.0f} s; probes running: "
                f"{','.join(running)}" + (f"; NOT loaded: {','.join(missing)}" if missing else ""),
                f"ring events/s (kernel emitted): {m('events_per_s'):>9,.0f}   [{each('events_per_s', ',.0f')}]"
                f"   dropped (ring full): [{each('dropped', 'd')}]",
                f"histogram samples/s:            {m('samples') / a.seconds:>9,.0f}",
                f"agent VmHWM:                    {m('hwm'):>9.0f} MiB  [{each('hwm', '.0f')}]   target < 128 MiB",
                f"peak RssAnon {m('peak_anon'):.0f} MiB, peak RssFile {m('peak_file'):.0f} MiB (incl. rings), "
                f"VmRSS before the storm {m('idle_rss'):.0f} MiB",
            ]
            print("\n".join(block), flush=True)
            lines += block
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
