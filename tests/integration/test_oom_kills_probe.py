"""The oom_kills probe in the running kernel: a process that outgrows a 20 MiB memory
cgroup is killed by the OOM killer and becomes exactly one oom_kills row with the figures
the kernel logs for it, and one fatal_signals row (SIGKILL from the kernel).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_agent.loader import lent_maps, load_probe, mark_joined
from tests.support.memcg import MemoryCgroup, memory_cgroup
from tests.support.tracefs import run_in_private_tracefs

pytestmark = pytest.mark.root

LIMIT = 20 << 20
SI_KERNEL = 0x80


@dataclass(frozen=True)
class Settings:
    """The agent settings the loader reads (fleetscope.config.AgentOptions in the agent)."""

    bpf_dir: Path
    ring_bytes: int = 1 << 16
    filter_pid: int = 0
    filter_cgroup: str = ""
    loader: str = "libbpf"
    args_max: int = 512
    file_open_prefixes: tuple[str, ...] = ()
    file_open_all: bool = False


def killed_process_line(pid: int, timeout: float = 2.0) -> dict[str, int] | None:
    """The kernel's "Killed process PID (comm) total-vm:…" log line, parsed; None when
    /dev/kmsg cannot be read."""
    pattern = re.compile(
        rf"Killed process {pid} \(\S+\) total-vm:(\d+)kB, anon-rss:(\d+)kB, file-rss:(\d+)kB, "
        r"shmem-rss:(\d+)kB, UID:(\d+) pgtables:(\d+)kB oom_score_adj:(-?\d+)"
    )
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                time.sleep(0.05)
                continue
            except OSError:  # EPIPE: the buffer wrapped past us; keep reading
                continue
            if m := pattern.search(record):
                keys = ("total_vm_kb", "anon_rss_kb", "file_rss_kb", "shmem_rss_kb", "uid", "pgtables_kb",
                        "oom_score_adj")  # fmt: skip
                return dict(zip(keys, (int(g) for g in m.groups()), strict=True))
    finally:
        os.close(fd)
    return None


@pytest.fixture
def memcg() -> Iterator[MemoryCgroup]:
    with memory_cgroup(LIMIT) as cg:
        yield cg


def test_a_real_oom_kill_is_one_row_with_the_kernels_figures(bpf_objects: Path, memcg: MemoryCgroup) -> None:
    settings = Settings(bpf_objects)
    t0 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    with load_probe("oom_kills", settings) as oom, load_probe("fatal_signals", settings) as fatal:
        assert oom.attached == {"oom/mark_victim": "raw_tp__mark_victim"}
        oom.rings["oom_kills"].drain()
        fatal.rings["fatal_signals"].drain()
        victim = memcg.spawn_hog(oom_score_adj=500)
        assert victim.wait(60) == -9
        time.sleep(0.05)
        rows = oom.rings["oom_kills"].drain()
        deaths = fatal.rings["fatal_signals"].drain()
        stats = oom.stats()["oom_kills"]
    t1 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    comm = Path(sys.executable).name.encode()[:15]
    row = rows[rows["pid"] == victim.pid]
    assert len(row) == 1, rows
    r = row[0]
    assert r["comm"] == comm and r["uid"] == 0 and r["oom_score_adj"] == 500
    assert r["cgroup_id"] == os.stat(memcg.v2_dir).st_ino
    # the victim ran out itself: it is also the task that triggered the kill
    assert (r["trigger_pid"], r["trigger_comm"], r["trigger_cgroup_id"]) == (victim.pid, comm, r["cgroup_id"])
    assert t0 <= r["time_ns"] <= t1
    assert 8 << 10 <= r["anon_rss_kb"] <= LIMIT >> 10  # most of the 20 MiB is the hog's
    assert r["total_vm_kb"] > r["anon_rss_kb"] and r["pgtables_kb"] > 0
    assert stats == {"emitted": len(rows), "dropped": 0}
    assert r["flags"] == 0  # figures known; no process probe reads oom_victims: the row's own span

    logged = killed_process_line(victim.pid)
    if logged is not None:  # the same numbers as the kernel's own report
        assert logged == {k: int(r[k]) for k in logged}

    death = deaths[deaths["pid"] == victim.pid]
    assert len(death) == 1
    d = death[0]
    assert (d["signal"], d["code"], d["sender_pid"], d["flags"] & 2) == (9, SI_KERNEL, victim.pid, 2)


FIGURES = ("total_vm_kb", "anon_rss_kb", "file_rss_kb", "shmem_rss_kb", "pgtables_kb", "oom_score_adj")


def test_the_victims_process_exit_row_carries_the_kill(bpf_objects: Path, memcg: MemoryCgroup) -> None:
    """With the process probe reading oom_kills' and fatal_signals' maps (as the agent loads
    them), the victim's process_exit record has the figures of its oom_kills row, the kill's
    time and the SIGKILL's sender, and both rows say that it does."""
    settings = Settings(bpf_objects)
    with (
        load_probe("oom_kills", settings) as oom,
        load_probe("fatal_signals", settings) as fatal,
        load_probe("process", settings, reuse=lent_maps([oom, fatal])) as proc,
    ):
        assert proc.borrowed == ("oom_victims", "fatal_signals_senders")
        mark_joined(proc, [oom, fatal, proc])
        for ring in (*oom.rings.values(), *fatal.rings.values(), *proc.rings.values()):
            ring.drain()
        victim = memcg.spawn_hog(oom_score_adj=400)
        assert victim.wait(60) == -9
        time.sleep(0.05)
        kills = oom.rings["oom_kills"].drain()
        deaths = fatal.rings["fatal_signals"].drain()
        exits = proc.rings["process_exit"].drain()
    (r,) = kills[kills["pid"] == victim.pid]
    (d,) = deaths[deaths["pid"] == victim.pid]
    (x,) = exits[exits["pid"] == victim.pid]
    assert r["flags"] & 2 and d["flags"] & 4  # OOM_KILLS_IN_PROCESS_EXIT, FATAL_SIGNALS_IN_PROCESS_EXIT
    assert x["flags"] == 1 | 2 | 4  # OOM-killed, sender known, fatal_signals joined
    assert {k: int(x[f"oom_{k}" if k != "oom_score_adj" else k]) for k in FIGURES} == {k: int(r[k]) for k in FIGURES}
    assert x["oom_score_adj"] == 400 and x["oom_trigger_pid"] == r["trigger_pid"] == victim.pid
    assert x["time_ns"] - x["oom_delay_ns"] == r["time_ns"]  # the kill's time, as its row has it
    assert (x["signal"], x["signal_code"], x["signal_sender_pid"]) == (9, SI_KERNEL, victim.pid)


CLASSIC = r"""
import json, sys
from pathlib import Path
from node_agent.libbpf import BpfObject
from node_agent.ringbuf import RingBuffer
from node_agent.probes.oom_kills import rodata
from tests.support.memcg import MemoryCgroup

bpf_dir, v2_dir, *procs = sys.argv[1:]
rows = {}
objs, rings = [], {}
for prog in ("tracepoint__oom__mark_victim", "raw_tp__mark_victim"):
    obj = BpfObject.open(Path(bpf_dir) / "oom_kills.bpf.o")
    obj.set_rodata(**rodata(None))
    obj.load()
    obj.attach(prog)
    objs.append(obj)
    rings[prog] = RingBuffer(obj.map_fd("oom_kills_events"), 1 << 16, obj.btf.struct_dtype("oom_kills_event"))
hog = MemoryCgroup(tuple(map(Path, procs)), Path(v2_dir)).spawn_hog(oom_score_adj=300)
assert hog.wait(60) == -9
out = {"pid": hog.pid}
for prog, ring in rings.items():
    rec = ring.drain()
    rec = rec[rec["pid"] == hog.pid]
    out[prog] = [{k: (v.decode() if isinstance(v, bytes) else int(v)) for k, v in zip(rec.dtype.names, r.item())}
                 for r in rec]
    ring.close()
for obj in objs:
    obj.close()
print(json.dumps(out))
"""


def test_classic_tracepoint_reports_the_same_victim(bpf_objects: Path, memcg: MemoryCgroup) -> None:
    """In a private tracefs, the classic tracepoint and raw_tp programs watch the same OOM
    kill: the rows agree field by field (the victim triggered it, so even the classic one
    knows its cgroup)."""
    result = run_in_private_tracefs(
        [sys.executable, "-c", CLASSIC, str(bpf_objects), str(memcg.v2_dir), *map(str, memcg.procs)],
        "oom_kills probe",
        timeout=120,
    )
    classic, raw = result["tracepoint__oom__mark_victim"], result["raw_tp__mark_victim"]
    assert len(classic) == len(raw) == 1
    differ = {k for k in raw[0] if k != "time_ns" and classic[0][k] != raw[0][k]}
    assert not differ, (classic[0], raw[0])
    assert raw[0]["oom_score_adj"] == 300 and raw[0]["cgroup_id"] == os.stat(memcg.v2_dir).st_ino
