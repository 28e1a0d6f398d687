"""The process probe in the running kernel: every exec and exit of processes this test
starts arrives once, with the right fields; drops are counted exactly; bad objects fail
to load with the verifier's log. The ring reader's edge cases run on a crafted ring.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from node_agent.errors import ProbeConfigError, ProbeLoadError, RingBufferError
from node_agent.libbpf import BpfObject
from node_agent.loader import LoadedProbe, load_probe
from node_agent.probes import Hook, Probe, Stream, get_probe
from node_agent.ringbuf import RingBuffer
from tests.support.real import require_real
from tests.support.tracefs import run_in_private_tracefs

REPO = Path(__file__).resolve().parents[2]
BPF_DIR = REPO / "bpf"
EXEC_STRIDE = 8 + 1336  # ring record: header + struct process_exec_event


@dataclass(frozen=True)
class Settings:
    """The agent settings the loader reads (fleetscope.config.AgentOptions in the agent)."""

    bpf_dir: Path = BPF_DIR
    ring_bytes: int = 8 << 20
    args_max: int = 1024
    filter_pid: int = 0
    filter_cgroup: str = ""


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def drain_all(probe: LoadedProbe) -> dict[str, np.ndarray]:
    """Everything committed in each ring right now."""
    return {stream: ring.drain() for stream, ring in probe.rings.items()}


def concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0)


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpf_dir() -> Path:
    """bpf/ with process.bpf.o built (`make -C bpf`), on a kernel that can load it."""
    if not bpf_capable():
        require_real("process probe: needs root or CAP_BPF+CAP_PERFMON to load eBPF")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        require_real("process probe: no kernel BTF at /sys/kernel/btf/vmlinux (CO-RE)")
    for tool in ("make", "clang", "bpftool"):
        if shutil.which(tool) is None:
            require_real(f"process probe: building bpf/ needs `{tool}` (apt install clang bpftool)")
    build = subprocess.run(["make", "-C", str(BPF_DIR)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    return BPF_DIR


def bpf_capable() -> bool:
    """Whether this process may load tracing programs: CAP_SYS_ADMIN, or CAP_BPF and
    CAP_PERFMON, in its effective set."""
    status = Path("/proc/self/status").read_text()
    eff = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    cap_sys_admin, cap_perfmon, cap_bpf = 21, 38, 39
    return bool(eff >> cap_sys_admin & 1) or bool(eff >> cap_perfmon & eff >> cap_bpf & 1)


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, fstype, *_ = line.split()
        if fstype == "cgroup2":
            return Path(where)
    return None


@pytest.fixture
def own_cgroup() -> Iterator[int]:
    """Move this process into a fresh kubelet-shaped cgroup v2; yield its id (inode)."""
    root = cgroup2_mount()
    if root is None:
        require_real("process probe: no cgroup v2 mount (bpf_get_current_cgroup_id needs one)")
    current = next(
        line.split("::", 1)[1] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")
    )
    home = root / current.lstrip("/")
    top = root / f"fleetscope-test-{uuid.uuid4().hex[:8]}.slice"
    leaf = top / f"kubepods-pod{uuid.uuid4()}.slice" / f"cri-containerd-{uuid.uuid4().hex}.scope"
    leaf.mkdir(parents=True)
    try:
        (leaf / "cgroup.procs").write_text(str(os.getpid()))
        yield os.stat(leaf).st_ino
    finally:
        (home / "cgroup.procs").write_text(str(os.getpid()))
        for d in (leaf, leaf.parent, top):
            d.rmdir()


@pytest.fixture
def probe(bpf_dir: Path) -> Iterator[LoadedProbe]:
    with load_probe("process", Settings(bpf_dir=bpf_dir)) as p:
        drain_all(p)  # start from an empty ring
        yield p


def exact_path(tmp_path: Path, length: int) -> Path:
    """A symlink to /bin/true whose absolute path is exactly length bytes long."""
    base = str(tmp_path) + "/"
    room = length - len(base)
    parts = []
    while room > 200:
        parts.append("d" * 150)
        room -= 151
    parts.append("t" * room)
    path = Path(base + "/".join(parts))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/bin/true")
    assert len(str(path)) == length
    return path


# --- the probe in the kernel -------------------------------------------------------------


@pytest.mark.root
def test_every_exec_and_exit_arrives_once_with_its_fields(probe: LoadedProbe, own_cgroup: int, tmp_path: Path) -> None:
    me, t0 = os.getpid(), boot_ns()
    marker = uuid.uuid4().hex[:12]
    expected: dict[int, tuple[list[bytes], int]] = {}  # pid -> (argv, exit code)
    execs: list[np.ndarray] = []
    exits: list[np.ndarray] = []
    for i in range(200):
        code = (i * 7) % 256
        if i % 2:
            argv = [b"/bin/sh", b"-c", f"exit {code}".encode(), f"{marker}-{i}".encode()]
        else:
            argv, code = [b"/bin/true", f"{marker}-{i}".encode(), b"x" * (i % 50)], 0
        p = subprocess.Popen(argv)
        assert p.wait() == code
        expected[p.pid] = (argv, code)
        if i % 50 == 49:  # drain while spawning, like the agent's timer
            got = drain_all(probe)
            execs.append(got["process_exec"])
            exits.append(got["process_exit"])
    killed = subprocess.Popen(["/bin/sleep", "30"])
    time.sleep(0.05)
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    threads = subprocess.Popen([
        sys.executable, "-c",
        "import threading\n"
        "ts = [threading.Thread(target=lambda: None) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "raise SystemExit(7)",
    ])  # fmt: skip
    assert threads.wait() == 7
    long_arg = b"L" * 3000
    truncated_args = subprocess.Popen(["/bin/true", marker, long_arg])
    assert truncated_args.wait() == 0
    path_255, path_300 = exact_path(tmp_path / "a", 255), exact_path(tmp_path / "b", 300)
    exact_name = subprocess.Popen([str(path_255)])
    long_name = subprocess.Popen([str(path_300)])
    assert exact_name.wait() == 0 and long_name.wait() == 0
    got = drain_all(probe)
    execs.append(got["process_exec"])
    exits.append(got["process_exit"])
    t1 = boot_ns()

    ex, xt = concat(execs), concat(exits)
    ex, xt = ex[ex["ppid"] == me], xt[xt["ppid"] == me]
    assert ex.dtype.itemsize == 1336 and xt.dtype.itemsize == 152
    by_pid = {int(r["pid"]): r for r in ex}
    assert len(by_pid) == len(ex), "one exec record per process"
    exit_by_pid = {int(r["pid"]): r for r in xt}
    assert len(exit_by_pid) == len(xt), "one exit record per process, not per thread"

    for pid, (argv, code) in expected.items():
        e, x = by_pid[pid], exit_by_pid[pid]
        raw = b"\0".join(argv) + b"\0"
        assert e["filename"] == argv[0]
        assert e["comm"] == argv[0].rsplit(b"/", 1)[1]
        assert e["args_len"] == len(raw) and e["argc"] == len(argv)
        assert e["args"] == raw.rstrip(b"\0")  # 'S' fields drop trailing NULs on read
        assert e["flags"] == 0 and e["uid"] == os.getuid() == 0
        assert e["cgroup_id"] == x["cgroup_id"] == own_cgroup
        assert t0 <= e["time_ns"] <= x["time_ns"] <= t1
        assert x["exit_code"] == code and x["signal"] == 0
        assert 0 < x["duration_ns"] <= t1 - t0
        assert x["comm"] == e["comm"]

    k = exit_by_pid[killed.pid]
    assert (k["signal"], k["exit_code"]) == (signal.SIGKILL, 0)
    # without oom_kills / fatal_signals sharing their maps the joined fields stay zero
    assert (k["flags"], k["signal_sender_pid"], k["oom_delay_ns"], k["signal_sender_comm"]) == (0, 0, 0, b"")
    assert by_pid[killed.pid]["filename"] == b"/bin/sleep"
    assert exit_by_pid[threads.pid]["exit_code"] == 7

    t = by_pid[truncated_args.pid]
    full = b"/bin/true\0" + marker.encode() + b"\0" + long_arg + b"\0"
    assert t["args_len"] == 1024 and t["flags"] & 1 and not t["flags"] & 2
    assert t["args"] == full[:1024]  # copied as is, cut at args_max
    assert t["argc"] == 3  # two whole arguments and the cut-off third

    assert by_pid[exact_name.pid]["filename"] == str(path_255).encode()
    assert by_pid[exact_name.pid]["flags"] == 0  # 255 bytes + NUL fit exactly
    cut = by_pid[long_name.pid]
    assert cut["flags"] & 2 and cut["filename"] == str(path_300).encode()[:255]

    stats = probe.stats()
    assert stats["process_exec"]["dropped"] == stats["process_exit"]["dropped"] == 0
    assert stats["process_exec"]["emitted"] >= len(expected) + 5


@pytest.mark.root
def test_tiny_ring_counts_every_drop(bpf_dir: Path) -> None:
    with load_probe("process", Settings(bpf_dir=bpf_dir, ring_bytes=4096)) as probe:
        assert probe.rings["process_exec"].max_entries == 4096
        read = {stream: len(records) for stream, records in drain_all(probe).items()}
        before = probe.stats()
        burst = [subprocess.Popen(["/bin/true", str(i)]) for i in range(40)]
        for p in burst:
            assert p.wait() == 0
        probe.detach()  # no new events: the counters settle
        time.sleep(0.1)
        for stream, records in drain_all(probe).items():
            read[stream] += len(records)
        after = probe.stats()
    exec_stats = after["process_exec"]
    assert exec_stats["dropped"] - before["process_exec"]["dropped"] >= 40 - 4096 // EXEC_STRIDE
    for stream, c in after.items():
        assert c["emitted"] == read[stream] + c["dropped"], stream


@pytest.mark.root
def test_targ_tgid_keeps_one_process(bpf_dir: Path) -> None:
    target = subprocess.Popen(["/bin/sh", "-c", "read line; exec /bin/true tgid-marker"], stdin=subprocess.PIPE)
    try:
        with load_probe("process", Settings(bpf_dir=bpf_dir), rodata={"targ_tgid": target.pid}) as probe:
            other = subprocess.Popen(["/bin/true", "other"])
            assert other.wait() == 0
            assert target.stdin is not None
            target.stdin.write(b"go\n")
            target.stdin.close()
            assert target.wait() == 0
            got = drain_all(probe)
    finally:
        target.kill()
        target.wait()
    assert got["process_exec"]["pid"].tolist() == [target.pid]
    assert got["process_exec"]["args"][0] == b"/bin/true\0tgid-marker"
    assert got["process_exit"]["pid"].tolist() == [target.pid]


@pytest.mark.root
def test_wakeup_policy(bpf_dir: Path) -> None:
    """Below wakeup_bytes the kernel submits with BPF_RB_NO_WAKEUP: a sleeping reader is
    not woken, the records wait for the agent's timer; at wakeup_bytes it is woken."""
    threshold = 8 << 20  # other processes' execs fill it at ~5 MB/s at worst, seen here
    settings = Settings(bpf_dir=bpf_dir, ring_bytes=16 << 20)
    with load_probe("process", settings, rodata={"wakeup_bytes": threshold}) as probe:
        ring = probe.rings["process_exec"]
        ep = select.epoll()
        try:
            ep.register(ring.fileno(), select.EPOLLIN)
            while True:  # settle: nothing pending, nothing reported
                ring.drain()
                if not ep.poll(0):
                    break
            assert subprocess.call(["/bin/true"]) == 0
            woken = ep.poll(0.3)
            # a wakeup is only legitimate once the backlog reached the threshold
            assert woken == [] or ring.pending_bytes() >= threshold
            assert ring.pending_bytes() > 0
            assert os.getpid() in set(ring.drain()["ppid"].tolist())
        finally:
            ep.close()


@pytest.mark.root
async def test_forced_wakeup_wakes_the_event_loop(bpf_dir: Path) -> None:
    with load_probe("process", Settings(bpf_dir=bpf_dir), rodata={"wakeup_bytes": 1}) as probe:
        ring = probe.rings["process_exit"]
        ring.drain()
        loop = asyncio.get_running_loop()
        woke = asyncio.Event()
        loop.add_reader(ring.fileno(), woke.set)
        try:
            proc = await asyncio.create_subprocess_exec("/bin/true")
            assert await proc.wait() == 0
            await asyncio.wait_for(woke.wait(), 5)
        finally:
            loop.remove_reader(ring.fileno())
        assert proc.pid in set(ring.drain()["pid"].tolist())


@pytest.mark.root
def test_classic_tracepoints_attach_where_tracefs_is_mounted(bpf_dir: Path, tmp_path: Path) -> None:
    """The tracepoint programs are preferred; tracefs is mounted in a private mount
    namespace (the host's mounts stay untouched) to run them."""
    script = tmp_path / "tp.py"
    script.write_text(
        "import json, os, subprocess, sys\n"
        "from pathlib import Path\n"
        "from dataclasses import dataclass\n"
        "from node_agent.loader import load_probe\n"
        "@dataclass(frozen=True)\n"
        "class Settings:\n"
        f"    bpf_dir: Path = Path({str(bpf_dir)!r})\n"
        "    ring_bytes: int = 1 << 20\n"
        "    args_max: int = 512\n"
        "    filter_pid: int = 0\n"
        '    filter_cgroup: str = ""\n'
        "with load_probe('process', Settings()) as p:\n"
        "    child = subprocess.Popen(['/bin/sh', '-c', 'exit 3', 'tp-marker'])\n"
        "    child.wait()\n"
        "    ex = p.rings['process_exec'].drain()\n"
        "    xt = p.rings['process_exit'].drain()\n"
        "    e = ex[ex['pid'] == child.pid]\n"
        "    x = xt[xt['pid'] == child.pid]\n"
        "    print(json.dumps({'attached': p.attached, 'filename': e['filename'][0].decode(),\n"
        "        'args': e['args'][0].decode(), 'code': int(x['exit_code'][0])}))\n"
    )
    result = run_in_private_tracefs([sys.executable, str(script)], "process probe")
    assert result["attached"] == {
        "sched/sched_process_exec": "tracepoint__sched__sched_process_exec",
        "sched/sched_process_exit": "tracepoint__sched__sched_process_exit",
    }
    assert result["filename"] == "/bin/sh"  # read through the tracepoint's __data_loc
    assert result["args"] == "/bin/sh\0-c\0exit 3\0tp-marker"
    assert result["code"] == 3


@pytest.mark.root
def test_probe_falls_back_to_raw_tp_and_detaches(bpf_dir: Path) -> None:
    with load_probe("process", Settings(bpf_dir=bpf_dir)) as probe:
        attached = probe.attached
        assert set(attached) == {"sched/sched_process_exec", "sched/sched_process_exit"}
        if not Path("/sys/kernel/tracing/events/sched").is_dir():
            assert all(p.startswith("raw_tp__") for p in attached.values())
        probe.detach()
        assert probe.attached == {}
    probe.close()  # idempotent


@pytest.mark.root
def test_bpf_object_autoload_rodata_and_attach_all(bpf_dir: Path) -> None:
    with BpfObject.open(bpf_dir / "process.bpf.o") as obj:
        for name in obj.program_names():
            if name.startswith("tracepoint__"):
                obj.set_autoload(name, False)  # e.g. no tracefs: keep them out of the kernel
        obj.set_rodata(args_max=64, targ_tgid=0)
        obj.set_max_entries("process_exec_events", 1 << 16)
        with pytest.raises(ValueError, match="does not fit"):
            obj.set_rodata(args_max=1 << 40)
        with pytest.raises(KeyError, match="nope"):
            obj.set_rodata(nope=1)
        obj.load()
        links = obj.attach_all()
        assert sorted(links) == ["raw_tp__sched_process_exec", "raw_tp__sched_process_exit"]
        fd = obj.map_fd("process_exec_events")
        with RingBuffer(fd, 1 << 16, obj.btf.struct_dtype("process_exec_event")) as ring:
            assert subprocess.call(["/bin/true", "a" * 100]) == 0
            mine = [r for r in ring.drain() if r["ppid"] == os.getpid()]
        assert len(mine) == 1 and mine[0]["args_len"] == 64 and mine[0]["flags"] & 1
        with pytest.raises(ValueError, match="already loaded"):
            obj.set_rodata(args_max=1)
    obj.close()  # idempotent


# --- failures are typed, carry the log, and leave nothing behind -------------------------

BROKEN = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct stream_stats {
	__u64 emitted;
	__u64 dropped;
};

/* a hash map: 6.18's verifier knows that an array lookup with a constant in-range key
 * cannot return NULL, so that would not be a bug */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stream_stats);
} broken_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} broken_events SEC(".maps");

SEC("raw_tp/sched_process_exec")
int raw_tp__sched_process_exec(void *ctx)
{
	__u32 key = 0;
	struct stream_stats *s = bpf_map_lookup_elem(&broken_stats, &key);

	s->emitted++; /* no NULL check: the verifier must refuse this */
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture
def broken_object(bpf_dir: Path, tmp_path: Path) -> Path:
    src, obj = tmp_path / "broken.bpf.c", tmp_path / "broken.bpf.o"
    src.write_text(BROKEN)
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", "-I", str(bpf_dir), "-c", str(src), "-o", str(obj)],
        check=True,
    )  # fmt: skip
    return obj


@pytest.mark.root
def test_verifier_rejection_is_a_probe_load_error_with_the_log(broken_object: Path) -> None:
    with BpfObject.open(broken_object) as obj, pytest.raises(ProbeLoadError) as caught:
        obj.load()
    err = caught.value
    assert err.errno == errno.EACCES and not err.retriable
    assert "invalid mem access 'map_value_or_null'" in err.log  # the verifier's own words
    assert str(err).startswith("load probe 'broken' failed: EACCES (permission denied): ")
    assert "verifier" in str(err)


@pytest.mark.root
def test_loader_raises_typed_errors(broken_object: Path, tmp_path: Path) -> None:
    broken = Probe(
        name="broken",
        object_file=broken_object.name,
        streams=(Stream("broken", "broken_events", "stream_stats", 0, lambda r, _: {}),),
        hooks=(Hook("sched/sched_process_exec", ("raw_tp__sched_process_exec",)),),
        stats_map="broken_stats",
        rodata=lambda _: {},
    )
    with pytest.raises(ProbeLoadError) as caught:
        load_probe(broken, Settings(bpf_dir=broken_object.parent))
    assert caught.value.errno == errno.EACCES and "map_value_or_null" in caught.value.log
    with pytest.raises(ProbeLoadError) as missing:
        load_probe("process", Settings(bpf_dir=tmp_path / "nowhere"))
    assert missing.value.errno == errno.ENOENT and "make -C bpf" in str(missing.value)
    with pytest.raises(ProbeConfigError, match="args_max"):
        load_probe("process", Settings(args_max=4096))
    with pytest.raises(ProbeConfigError, match="ring_bytes"):
        load_probe("process", Settings(ring_bytes=5000))
    with pytest.raises(ProbeConfigError, match="unknown probe 'nope'"):
        load_probe("nope", Settings())
    assert get_probe("process").streams[0].name == "process_exec"


# --- the ring reader on a crafted ring (no kernel needed) --------------------------------

PAYLOAD = np.dtype([("a", "<u8"), ("b", "<u4"), ("c", "S4")])  # 16 bytes, stride 24
BUSY, DISCARD = 1 << 31, 1 << 30


class FakeRing:
    """A memfd laid out like a ring buffer map: consumer page, producer page, data twice
    (the kernel maps the data pages twice; here writes go to both copies)."""

    def __init__(self, size: int = 4096) -> None:
        self.page, self.size = mmap.PAGESIZE, size
        self.fd = os.memfd_create("fake-ring")
        os.ftruncate(self.fd, 2 * self.page + 2 * size)
        self.mem = mmap.mmap(self.fd, 2 * self.page + 2 * size)
        self.prod = 0

    def put(self, a: int, header: int = PAYLOAD.itemsize) -> None:
        rec = np.zeros(1, PAYLOAD)
        rec["a"], rec["b"], rec["c"] = a, a * 2, b"r%d" % (a % 100)
        raw = np.uint32(header).tobytes() + b"\0" * 4 + rec.tobytes()
        off = self.prod % self.size
        for base in (2 * self.page + off, 2 * self.page + self.size + off):
            end = min(base + len(raw), len(self.mem))
            self.mem[base:end] = raw[: end - base]
        if off + len(raw) > self.size:  # the wrapped tail also lands at the start
            tail = raw[self.size - off :]
            self.mem[2 * self.page : 2 * self.page + len(tail)] = tail
        self.prod += 24
        self.mem[self.page : self.page + 8] = self.prod.to_bytes(8, "little")

    def cons(self) -> int:
        return int.from_bytes(self.mem[:8], "little")

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


@pytest.fixture
def fake() -> Iterator[FakeRing]:
    ring = FakeRing()
    yield ring
    ring.close()


def test_drain_reads_a_strided_region_and_advances(fake: FakeRing) -> None:
    with RingBuffer(fake.fd, fake.size, PAYLOAD) as rb:
        assert rb.stride == 24 and len(rb.drain()) == 0
        for i in range(10):
            fake.put(i)
        out = rb.drain(max_records=4)
        assert out.dtype == PAYLOAD and out["a"].tolist() == [0, 1, 2, 3]
        assert fake.cons() == 4 * 24
        out = rb.drain()
        assert out["a"].tolist() == list(range(4, 10)) and out["c"][5] == b"r9"
        assert fake.cons() == fake.prod and rb.pending_bytes() == 0
        assert out.flags.c_contiguous and out.flags.writeable and out.base is None


def test_drain_wraps_through_the_double_mapping(fake: FakeRing) -> None:
    with RingBuffer(fake.fd, fake.size, PAYLOAD) as rb:
        total = []
        for i in range(500):  # 500 * 24 bytes: wraps the 4096-byte ring several times
            fake.put(i)
            if i % 37 == 0:
                total += rb.drain()["a"].tolist()
        total += rb.drain()["a"].tolist()
        assert total == list(range(500))


def test_drain_stops_at_busy_and_skips_discarded(fake: FakeRing) -> None:
    with RingBuffer(fake.fd, fake.size, PAYLOAD) as rb:
        fake.put(0)
        fake.put(1, header=DISCARD | PAYLOAD.itemsize)
        fake.put(2)
        fake.put(3, header=BUSY | PAYLOAD.itemsize)  # reserved, not submitted yet
        fake.put(4)
        assert rb.drain()["a"].tolist() == [0, 2]
        assert fake.cons() == 3 * 24  # the busy record and all after it stay
        fake.mem[2 * fake.page + 72 : 2 * fake.page + 76] = np.uint32(16).tobytes()
        assert rb.drain()["a"].tolist() == [3, 4]


def test_drain_refuses_records_of_another_size(fake: FakeRing) -> None:
    with RingBuffer(fake.fd, fake.size, PAYLOAD) as rb:
        fake.put(0, header=20)
        with pytest.raises(RingBufferError, match="dtype does not match"):
            rb.drain()
        assert fake.cons() == 0  # nothing consumed
    with pytest.raises(ValueError, match="power of 2"):
        RingBuffer(fake.fd, 3000, PAYLOAD)


@pytest.mark.root
def test_cgroup_filter_keeps_the_cgroup_and_its_descendants(bpf_dir: Path) -> None:
    root = cgroup2_mount()
    if root is None:
        require_real("process probe: no cgroup v2 mount")
    top = root / f"fleetscope-filter-{uuid.uuid4().hex[:8]}.slice"
    leaf = top / "kubepods-besteffort.slice" / f"cri-containerd-{uuid.uuid4().hex}.scope"
    leaf.mkdir(parents=True)
    marker = uuid.uuid4().hex
    try:
        # relative to the cgroup2 mount, as an operator would write it
        settings = Settings(bpf_dir=bpf_dir, filter_cgroup=str(top.relative_to(root)))
        with load_probe("process", settings) as p:
            inside = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {leaf}/cgroup.procs && exec /bin/true in-{marker}"])
            outside = subprocess.Popen(["/bin/true", f"out-{marker}"])
            assert inside.wait() == 0 and outside.wait() == 0
            execs = p.rings["process_exec"].drain()
        args = {bytes(a).split(b"\0")[1] for a in execs["args"] if marker.encode() in bytes(a)}
        assert args == {f"in-{marker}".encode()}
        assert set(execs["cgroup_id"].tolist()) == {os.stat(leaf).st_ino}
    finally:
        for d in (leaf, leaf.parent, top):
            d.rmdir()


def test_cgroup_filter_names_a_missing_directory(bpf_dir: Path) -> None:
    with pytest.raises(ProbeConfigError, match=r"filter_cgroup: cannot open .*no-such"):
        load_probe("process", Settings(bpf_dir=bpf_dir, filter_cgroup="no-such.slice"))
