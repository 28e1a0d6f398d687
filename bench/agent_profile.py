"""Where the agent's CPU goes during a storm: py-spy samples of `fleetscope agent`.

Starts the agent for one storm of bench/agent_cost.py, samples it with py-spy (a sampling
profiler outside the process: `pip install py-spy` into the venv, measurement only) for the
length of the storm, and prints the functions by inclusive and by own share of the
samples (idle samples, i.e. the event loop waiting in epoll, are counted separately).

Usage (root): .venv/bin/python bench/agent_profile.py [--storm file_open_100k] [--seconds 8]
              [--out bench/results/agent_profile_<storm>.txt]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from agent_cost import OPEN_FILE, STORMS
from benchlib import RESULTS, Broker, agent, header, run_storm

PY_SPY = Path(sys.executable).parent / "py-spy"


def _short(frame: str) -> str:
    """ "func (path/file.py:123)" -> "func (file.py)"."""
    func, sep, where = frame.partition(" (")
    return f"{func} ({where.split(':')[0].rsplit('/', 1)[-1].rstrip(')')})" if sep else frame


def aggregate(collapsed: str) -> tuple[int, int, Counter[str], Counter[str]]:
    """py-spy raw output (collapsed stacks "f1;f2;...;fn count") -> totals per function."""
    total = idle = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = [_short(f) for f in stack.split(";") if not f.startswith("thread (")]
        total += count
        if any(("select" in f and "selectors" in f) or f.startswith("epoll") for f in frames[-3:]):
            idle += count
            continue
        for f in set(frames):
            inclusive[f] += count
        own[frames[-1]] += count
    return total, idle, inclusive, own


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storm", default="file_open_100k", choices=sorted(STORMS))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="include C frames (numpy, lz4, ...)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if not PY_SPY.exists() and shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    storm = STORMS[a.storm]
    if storm.mode == "open":
        Path(OPEN_FILE).write_bytes(b"")
    raw = Path(f"/tmp/fsbench-pyspy-{a.storm}.txt")
    with Broker() as broker, agent(broker, storm.probes, *storm.extra, tag=storm.name) as proc:
        assert proc.proc is not None
        spy_bin = str(PY_SPY if PY_SPY.exists() else "py-spy")
        cmd = [spy_bin, "record", "--nonblocking", "--threads", "-r", str(a.rate), "-d", str(int(a.seconds)),
               "-f", "raw", "-o", str(raw), "-p", str(proc.proc.pid)]  # fmt: skip
        if a.native:
            cmd.append("--native")
        spy = threading.Thread(target=subprocess.run, args=(cmd,), kwargs={"capture_output": True})
        spy.start()
        r = run_storm(storm.mode, a.seconds, storm.workers, storm.rate, storm.arg)
        spy.join()
    total, idle, inclusive, own = aggregate(raw.read_text())
    busy = max(total - idle, 1)
    lines = [
        header(),
        f"storm {storm.name}: {r.rate:,.0f} ops/s for {r.seconds:.1f} s; py-spy {a.rate}/s"
        f"{' --native' if a.native else ''}: {total} samples, {idle} idle (event loop waiting), "
        f"{busy} busy",
        "",
        f"inclusive share of busy samples (top {a.top}):",
        *(f"  {100 * n / busy:5.1f}%  {f}" for f, n in inclusive.most_common(a.top)),
        "",
        f"own share of busy samples (top {a.top}):",
        *(f"  {100 * n / busy:5.1f}%  {f}" for f, n in own.most_common(a.top)),
    ]
    out = Path(a.out or RESULTS / f"agent_profile_{a.storm}.txt")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
