"""The file_open probe in the running kernel: every captured open of this test arrives
once with its fields, the capture rule (failures, prefixes, all) holds, drops are counted
exactly, and the classic tracepoint programs (in a private tracefs) record the same rows
as raw_tp, including the count of opens the per-thread map could not hold.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from node_agent.loader import LoadedProbe, cgroup2_mount, load_probe
from node_agent.probes import file_open
from tests.support.opens import NUMBERS, Opened, captured, open_everything, rows_as_opened
from tests.support.tracefs import run_in_private_tracefs

REPO = Path(__file__).resolve().parents[2]
STRIDE = 8 + 320  # ring record: header + struct file_open_event

pytestmark = pytest.mark.root


@dataclass(frozen=True)
class Settings:
    """The agent settings the loader reads (fleetscope.config.AgentOptions in the agent)."""

    bpf_dir: Path
    ring_bytes: int = 4 << 20
    filter_pid: int = 0
    filter_cgroup: str = ""
    loader: str = "libbpf"
    args_max: int = 512
    file_open_prefixes: tuple[str, ...] = ("/etc/",)
    file_open_all: bool = False


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    """A watched and an unwatched directory with unique names (short: prefixes are <= 64 bytes)."""
    top = Path(f"/tmp/fs-fo-{uuid.uuid4().hex[:12]}")
    watched, outside = top / "watched", top / "outside"
    watched.mkdir(parents=True)
    outside.mkdir()
    yield watched, outside
    shutil.rmtree(top)


def own_cgroup_id() -> int:
    """cgroup v2 id (directory inode) of this process's cgroup."""
    line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
    return os.stat(cgroup2_mount() / line.split("::", 1)[1].lstrip("/")).st_ino


def mine(records: np.ndarray, top: Path) -> np.ndarray:
    """This process's rows about the test's directories (openat2's relative names too)."""
    paths = np.char.decode(records["path"].astype("S256"), "utf-8", "replace")
    ours = np.char.find(paths, top.name) >= 0
    return records[(records["pid"] == os.getpid()) & ours]


def run_and_read(probe: LoadedProbe, watched: Path, outside: Path) -> tuple[list[Opened], np.ndarray]:
    ring = probe.rings["file_open"]
    ring.drain()
    opens = open_everything(watched, outside)
    return opens, mine(ring.drain(), watched.parent)


def test_failures_and_prefixed_opens_arrive_once_with_their_fields(bpf_objects: Path, dirs: tuple[Path, Path]) -> None:
    watched, outside = dirs
    prefixes = (f"{watched}/",)
    t0 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    with load_probe("file_open", Settings(bpf_objects, file_open_prefixes=prefixes)) as probe:
        assert probe.attached == {"syscalls/sys_exit_openat": "raw_tp__sys_exit"}  # no tracefs here
        opens, rows = run_and_read(probe, watched, outside)
        stats = probe.stats()["file_open"]
    t1 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    expected = captured(opens, prefixes, capture_all=False)
    assert sorted(rows_as_opened(rows), key=str) == sorted(expected, key=str)
    assert len(rows) == len(expected)  # exactly once each
    assert sum(o.ret == -2 for o in expected) >= 50  # the missing files, ENOENT
    assert f"{outside}/present" not in {o.path for o in rows_as_opened(rows)}
    assert {o.syscall for o in expected} == {"openat"} | set(NUMBERS)
    created = next(o for o in expected if o.path.endswith("/created"))
    assert created.ret >= 0 and created.mode == 0o640  # the fd the test got back
    assert (rows["tid"] == threading.get_native_id()).all()
    assert (rows["uid"] == os.getuid()).all()
    assert (rows["cgroup_id"] == own_cgroup_id()).all()
    assert (rows["comm"] == Path("/proc/thread-self/comm").read_bytes().strip()).all()
    assert ((rows["time_ns"] >= t0) & (rows["time_ns"] <= t1)).all()
    assert (rows["rflags"] == 0).all()
    assert stats["dropped"] == 0


def test_file_open_all_records_every_open(bpf_objects: Path, dirs: tuple[Path, Path]) -> None:
    watched, outside = dirs
    settings = Settings(bpf_objects, file_open_prefixes=(), file_open_all=True)
    with load_probe("file_open", settings) as probe:
        opens, rows = run_and_read(probe, watched, outside)
    assert sorted(rows_as_opened(rows), key=str) == sorted(opens, key=str)
    assert f"{outside}/present" in {o.path for o in rows_as_opened(rows)}


def test_no_prefixes_records_failures_only(bpf_objects: Path, dirs: tuple[Path, Path]) -> None:
    watched, outside = dirs
    with load_probe("file_open", Settings(bpf_objects, file_open_prefixes=())) as probe:
        opens, rows = run_and_read(probe, watched, outside)
    assert sorted(rows_as_opened(rows), key=str) == sorted((o for o in opens if o.ret < 0), key=str)


def test_prefix_edges_and_long_paths(bpf_objects: Path, dirs: tuple[Path, Path]) -> None:
    """A 64-byte prefix (the maximum) matches only its own tree; a path longer than the
    record's 255 bytes is cut and flagged."""
    watched, _ = dirs
    full = watched / ("p" * (62 - len(str(watched))))
    prefix = f"{full}/"
    assert len(prefix) == 64
    full.mkdir()
    sibling = Path(str(full) + "q")  # shares the first 63 bytes, not the 64th
    sibling.mkdir()
    deep = full / ("d" * 200) / ("e" * 100)
    deep.mkdir(parents=True)
    (full / "in").write_text("x")
    (sibling / "out").write_text("x")
    (deep / "f").write_text("x")
    with load_probe("file_open", Settings(bpf_objects, file_open_prefixes=(prefix,))) as probe:
        ring = probe.rings["file_open"]
        ring.drain()
        for path in (full / "in", sibling / "out", deep / "f"):
            os.close(os.open(path, os.O_RDONLY))
        rows = mine(ring.drain(), watched.parent)
    assert [bytes(p) for p in rows["path"]] == [str(full / "in").encode(), str(deep / "f").encode()[:255]]
    assert rows["rflags"].tolist() == [0, file_open.PATH_TRUNCATED]


def test_tiny_ring_counts_every_drop(bpf_objects: Path, dirs: tuple[Path, Path]) -> None:
    watched, _ = dirs
    settings = Settings(bpf_objects, ring_bytes=4096, file_open_prefixes=())
    with load_probe("file_open", settings) as probe:
        ring = probe.rings["file_open"]
        read = len(ring.drain())
        before = probe.stats()["file_open"]
        for i in range(300):  # the storm: 300 failed opens, nothing drained meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.open(f"{watched}/storm-{i}", os.O_RDONLY)
        probe.detach()  # no new events: the counters settle
        rows = ring.drain()
        read += len(rows)
        after = probe.stats()["file_open"]
    assert after["emitted"] == read + after["dropped"]
    assert after["dropped"] - before["dropped"] >= 300 - 4096 // STRIDE
    assert 0 < len(mine(rows, watched.parent)) <= 4096 // STRIDE


# --- classic tracepoints, in a private mount namespace with tracefs -----------------------

CLASSIC = r"""
import json, os, sys, threading, time
from dataclasses import dataclass
from pathlib import Path
from node_agent.libbpf import BpfObject, num_possible_cpus
from node_agent.loader import load_probe
from node_agent.probes import file_open
from node_agent.ringbuf import RingBuffer
from tests.support.opens import open_everything, rows_as_opened

bpf_dir, watched, outside, fifo_dir = map(Path, sys.argv[1:5])

@dataclass(frozen=True)
class Settings:
    bpf_dir: Path = bpf_dir
    ring_bytes: int = 1 << 20
    filter_pid: int = 0
    filter_cgroup: str = ""
    loader: str = "libbpf"
    args_max: int = 512
    file_open_prefixes: tuple = (f"{watched}/", f"{fifo_dir}/")
    file_open_all: bool = False

out = {}
with load_probe("file_open", Settings()) as p:
    p.rings["file_open"].drain()
    opens = open_everything(watched, outside)
    rows = p.rings["file_open"].drain()
    rows = rows[rows["pid"] == os.getpid()]
    out["attached"] = p.attached
    out["rows"] = [o.as_dict() for o in rows_as_opened(rows) if watched.parent.name in o.path]
    out["opens"] = [o.as_dict() for o in opens]

# a per-thread map of 4: 6 threads block opening a FIFO, so 2 cannot be followed
obj = BpfObject.open(bpf_dir / "file_open.bpf.o")
knobs = dict(file_open.rodata(Settings()))
obj.set_rodata(targ_tgid=os.getpid(), **knobs)
obj.set_max_entries("file_open_inflight", 4)
obj.set_max_entries("file_open_events", 1 << 16)
obj.load()
fifo = fifo_dir / "fifo"
os.mkfifo(fifo)
fds = []
go = threading.Event()

def read_fifo():
    go.wait()
    fds.append(os.open(fifo, os.O_RDONLY))  # blocks until a writer comes

# daemons: if they never all block, the exit below must not wait for them
readers = [threading.Thread(target=read_fifo, daemon=True) for _ in range(6)]
for t in readers:
    t.start()
# Each reader's /proc syscall file ("NR args..." while it is blocked in syscall NR, "running"
# otherwise), opened before the programs attach: every open of this process is traced from
# then on, so the polling below must open nothing (it would take or overflow a map slot).
polls = [os.open(f"/proc/self/task/{t.native_id}/syscall", os.O_RDONLY) for t in readers]
for prog in ("tracepoint__syscalls__sys_enter_openat", "tracepoint__syscalls__sys_exit_openat"):
    obj.attach(prog)
ring = RingBuffer(obj.map_fd("file_open_events"), 1 << 16, obj.btf.struct_dtype("file_open_event"))
go.set()
# all six must be inside open() (past the enter program) before a writer comes
openat = {"x86_64": b"257", "aarch64": b"56"}[os.uname().machine]
deadline = time.monotonic() + 30
while (blocked := sum(os.pread(fd, 64, 0).split(b" ", 1)[0] == openat for fd in polls)) < 6:
    if time.monotonic() > deadline:
        sys.exit(f"only {blocked} of 6 reader threads were blocked in openat after 30 s")
    time.sleep(0.01)
for fd in polls:
    os.close(fd)
writer = os.open(fifo, os.O_RDWR)  # the map is still full: this open is not followed either
for t in readers:
    t.join()
for fd in fds + [writer]:
    os.close(fd)
# each open's exit program committed its record before the open returned: all are in the ring
rows = ring.drain()
raw = obj.lookup("file_open_stats", b"\0\0\0\0", 16 * num_possible_cpus())
out["full"] = file_open.inflight_full(obj)
out["fifo_rows"] = len(rows)
out["fifo_paths"] = sorted({bytes(r["path"]).decode() for r in rows})
stats = __import__("numpy").frombuffer(raw, "<u8").reshape(-1, 2).sum(axis=0).tolist()
out["emitted"], out["dropped"] = stats
ring.close()
obj.close()
print(json.dumps(out))
"""


def test_classic_tracepoints_record_the_same_rows(bpf_objects: Path, dirs: tuple[Path, Path]) -> None:
    watched, outside = dirs
    fifo_dir = watched.parent / "fifo"
    fifo_dir.mkdir()
    result = run_in_private_tracefs(
        [sys.executable, "-c", CLASSIC, str(bpf_objects), str(watched), str(outside), str(fifo_dir)],
        "file_open probe",
    )

    classic = {"openat"} | set(NUMBERS)
    assert result["attached"] == {
        f"syscalls/sys_{kind}_{s}": f"tracepoint__syscalls__sys_{kind}_{s}"
        for s in classic
        for kind in ("enter", "exit")
    }
    opens = [Opened(**o) for o in result["opens"]]
    expected = captured(opens, (f"{watched}/",), capture_all=False)
    assert sorted((Opened(**r) for r in result["rows"]), key=str) == sorted(expected, key=str)

    # 6 readers, 4 slots: 2 readers and the writer's open were not followed, and counted
    assert result["full"] == 3
    assert result["fifo_rows"] == 4 and result["fifo_paths"] == [str(fifo_dir / "fifo")]
    assert (result["emitted"], result["dropped"]) == (4 + 3, 3)


@pytest.mark.parametrize("probe, size", [("file_open", 320), ("oom_kills", 112), ("fatal_signals", 96)])
def test_records_knobs_and_builders_agree_with_the_object(bpf_objects: Path, probe: str, size: int) -> None:
    """The BTF record is the C struct's size, the knobs fit .rodata, and the builder makes
    exactly the columns of the stream's protobuf message."""
    from fleetscope.codec import SCHEMAS
    from node_agent.btf import Btf
    from node_agent.probes import get_probe

    p = get_probe(probe)
    btf = Btf.from_file(bpf_objects / p.object_file)
    stream = p.streams[0]
    dtype = btf.struct_dtype(stream.struct)
    assert dtype.itemsize == size
    from node_agent.cgroups import IDENTITY_COLUMNS

    cols = stream.columns(np.zeros(3, dtype), 0)
    # the batcher adds the workload identity columns (container_id, pod_uid, ...) itself
    assert set(cols) | set(IDENTITY_COLUMNS) == {c.name for c in SCHEMAS[stream.name].columns}
    layout = btf.datasec_vars(".rodata")
    for knob, value in p.rodata(Settings(bpf_objects, file_open_prefixes=("/etc/",))).items():
        width = len(value) if isinstance(value, bytes) else None
        assert knob in layout and (width is None or layout[knob][1] == width), knob
