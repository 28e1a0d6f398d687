"""The bcc fallback loader in the running kernel: the process, file_open, fatal_signals and
oom_kills probes loaded through bcc and through libbpf at the same time see the same
activity as identical rows (raw tracepoints here, classic ones in a private tracefs); record
layouts match; probes it cannot run and kernels it cannot serve are reported with the reason;
`fleetscope run --loader bcc` stores the rows; `--check` reports every probe and loader.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fleetscope.config import AgentOptions
from node_agent.bcc_loader import BccProbe, BccUnavailable, import_bcc, load_probe_bcc, load_selected
from node_agent.btf import Btf
from node_agent.check import check
from node_agent.errors import ProbeConfigError
from node_agent.loader import LoadedProbe, load_probe
from node_agent.probes import Hook, KernelField, get_probe
from node_agent.probes.process import PROBE, exec_columns, exit_columns
from tests.integration.test_fatal_signals_probe import PYTHON_COMM, SEGFAULT, py, started
from tests.integration.test_pipeline import assert_marker_rows
from tests.integration.test_tcp_connections import run_exchanges, running_server
from tests.support.memcg import memory_cgroup
from tests.support.opens import captured, open_everything, rows_as_opened
from tests.support.procs import FleetscopeProcess, spawn_markers
from tests.support.real import require_real
from tests.support.tracefs import run_in_private_tracefs

pytestmark = [pytest.mark.root, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
# what both loaders must agree on (time and duration differ by the programs' run order)
EXEC_FIELDS = ("pid", "ppid", "uid", "cgroup_id", "comm", "filename", "args", "args_len", "argc", "flags")
EXIT_FIELDS = ("pid", "ppid", "cgroup_id", "comm", "exit_code", "signal")


@dataclass(frozen=True)
class Settings:
    """The agent settings the loaders read (fleetscope.config.AgentOptions in the agent)."""

    bpf_dir: Path
    loader: str = "bcc"
    ring_bytes: int = 8 << 20
    args_max: int = 1024
    filter_pid: int = 0
    filter_cgroup: str = ""
    file_open_prefixes: tuple[str, ...] = ()
    file_open_all: bool = False
    histogram_max_keys: int = 4096
    tcp_max_connections: int = 65536


@pytest.fixture(scope="module")
def bcc_ready(bpf_objects: Path) -> Path:
    """bpf/ built, and bcc importable (Debian's python3-bpfcc, installed by `make test`)."""
    try:
        import_bcc()
    except (ImportError, OSError) as e:
        require_real(f"bcc fallback: {e}")
    return bpf_objects


def rows(records: np.ndarray, fields: tuple[str, ...], pids: set[int]) -> list[tuple[object, ...]]:
    """The given fields of the records of pids, as sorted plain tuples."""
    mine = records[np.isin(records["pid"], list(pids))]
    return sorted(tuple(r[f].item() for f in fields) for r in mine)


def spawn_mix(marker: str, tmp_path: Path) -> dict[int, tuple[list[bytes], int, int]]:
    """Marker processes covering the fields: exit codes, a signal, threads, long argv and a
    path that fills filename[]; pid -> (argv, exit code, signal)."""
    out: dict[int, tuple[list[bytes], int, int]] = {}
    for i in range(60):
        argv = [b"/bin/sh", b"-c", f"exit {i * 5 % 256}".encode(), f"{marker}-{i}".encode(), b"a" * (i * 7)]
        p = subprocess.Popen(argv)
        assert p.wait() == i * 5 % 256
        out[p.pid] = (argv, i * 5 % 256, 0)
    killed = subprocess.Popen(["/bin/sleep", "30"])
    time.sleep(0.05)
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    out[killed.pid] = ([b"/bin/sleep", b"30"], 0, signal.SIGKILL)
    code = "import threading\n[t.start() or t.join() for t in [threading.Thread(target=int)] * 1]\nraise SystemExit(9)"
    threads = subprocess.Popen([sys.executable, "-c", code, marker])
    assert threads.wait() == 9
    out[threads.pid] = ([sys.executable.encode(), b"-c", code.encode(), marker.encode()], 9, 0)
    long = subprocess.Popen(["/bin/true", marker, "L" * 3000])
    assert long.wait() == 0
    out[long.pid] = ([b"/bin/true", marker.encode(), b"L" * 3000], 0, 0)
    deep = tmp_path / ("d" * 200) / ("e" * 100)
    deep.parent.mkdir(parents=True)
    deep.symlink_to("/bin/true")
    cut = subprocess.Popen([str(deep), marker])
    assert cut.wait() == 0
    out[cut.pid] = ([str(deep).encode(), marker.encode()], 0, 0)
    return out


@pytest.fixture
def both(bcc_ready: Path) -> Iterator[tuple[LoadedProbe, BccProbe]]:
    """The process probe loaded through libbpf and through bcc at once, rings empty."""
    settings = Settings(bpf_dir=bcc_ready)
    with load_probe("process", settings) as libbpf, load_probe_bcc("process", settings) as bcc:
        for p in (libbpf, bcc):
            for ring in p.rings.values():
                ring.drain()
        yield libbpf, bcc


def test_both_loaders_give_identical_rows(both: tuple[LoadedProbe, BccProbe], tmp_path: Path) -> None:
    libbpf, bcc = both
    assert bcc.attached.keys() == libbpf.attached.keys()
    for stream in ("process_exec", "process_exit"):
        assert bcc.rings[stream].dtype == libbpf.rings[stream].dtype  # one layout, from the object's BTF
    expected = spawn_mix(uuid.uuid4().hex[:10], tmp_path)
    pids = set(expected)
    got = {
        name: {stream: ring.drain() for stream, ring in p.rings.items()}
        for name, p in (("libbpf", libbpf), ("bcc", bcc))
    }
    ex_l, ex_b = got["libbpf"]["process_exec"], got["bcc"]["process_exec"]
    xt_l, xt_b = got["libbpf"]["process_exit"], got["bcc"]["process_exit"]
    assert rows(ex_b, EXEC_FIELDS, pids) == rows(ex_l, EXEC_FIELDS, pids)
    assert rows(xt_b, EXIT_FIELDS, pids) == rows(xt_l, EXIT_FIELDS, pids)

    # and they are right, not just equal
    by_pid = {int(r["pid"]): r for r in ex_b[np.isin(ex_b["pid"], list(pids))]}
    exit_by_pid = {int(r["pid"]): r for r in xt_b[np.isin(xt_b["pid"], list(pids))]}
    assert sorted(by_pid) == sorted(exit_by_pid) == sorted(pids)
    for pid, (argv, code, sig) in expected.items():
        e, x = by_pid[pid], exit_by_pid[pid]
        raw = b"\0".join(argv) + b"\0"
        assert e["ppid"] == x["ppid"] == os.getpid() and e["uid"] == 0
        assert e["filename"] == argv[0][:255] and bool(e["flags"] & 2) == (len(argv[0]) > 255)
        assert e["args"] == raw[:1024].rstrip(b"\0") and bool(e["flags"] & 1) == (len(raw) > 1024)
        assert e["argc"] == raw[:1024].count(b"\0") + (len(raw) > 1024)
        assert (x["exit_code"], x["signal"]) == (code, sig)
        assert x["duration_ns"] > 0 and x["time_ns"] >= e["time_ns"]

    # the columns the batches carry are the same too (time aside)
    for build, a, b in ((exec_columns, ex_l, ex_b), (exit_columns, xt_l, xt_b)):
        a = np.sort(a[np.isin(a["pid"], list(pids))], order="pid")
        b = np.sort(b[np.isin(b["pid"], list(pids))], order="pid")
        ca, cb = build(a, 0), build(b, 0)
        for column in ca.keys() - {"time", "duration_ns"}:
            assert np.array_equal(ca[column], cb[column]), column

    for p in (libbpf, bcc):
        stats = p.stats()
        assert all(s["dropped"] == 0 and s["emitted"] >= len(pids) for s in stats.values())


def test_bcc_counts_drops_and_filters(bcc_ready: Path) -> None:
    with load_probe_bcc("process", Settings(bpf_dir=bcc_ready, ring_bytes=4096)) as probe:
        read = {stream: len(ring.drain()) for stream, ring in probe.rings.items()}
        burst = [subprocess.Popen(["/bin/true", str(i)]) for i in range(30)]
        assert all(p.wait() == 0 for p in burst)
        probe.detach()
        assert probe.attached == {}
        # a program already running when detach() returned (the host execs too) may still
        # write its record: read until every emitted record is accounted for
        deadline = time.monotonic() + 30
        while True:
            for stream, ring in probe.rings.items():
                read[stream] += len(ring.drain())
            after = probe.stats()
            if all(c["emitted"] == read[s] + c["dropped"] for s, c in after.items()) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    assert after["process_exec"]["dropped"] > 0  # a 4 KiB ring holds 3 exec records
    for stream, c in after.items():
        assert c["emitted"] == read[stream] + c["dropped"], stream

    target = subprocess.Popen(["/bin/sh", "-c", "read l; exec /bin/true only-me"], stdin=subprocess.PIPE)
    try:
        with load_probe_bcc("process", Settings(bpf_dir=bcc_ready, filter_pid=target.pid)) as probe:
            assert subprocess.call(["/bin/true", "not-me"]) == 0
            assert target.stdin is not None
            target.stdin.write(b"\n")
            target.stdin.close()
            assert target.wait() == 0
            execs = probe.rings["process_exec"].drain()
    finally:
        target.kill()
        target.wait()
    assert execs["pid"].tolist() == [target.pid] and execs["args"][0] == b"/bin/true\0only-me"


async def test_bcc_forced_wakeup_wakes_the_event_loop(bcc_ready: Path) -> None:
    """wakeup_bytes reaches the bcc program as a macro: at 1 byte every record wakes the reader."""
    settings = Settings(bpf_dir=bcc_ready, ring_bytes=1 << 16)
    with load_probe_bcc("process", settings, rodata={"wakeup_bytes": 1}) as probe:
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


def test_classic_tracepoints_through_bcc_in_a_private_tracefs(bcc_ready: Path, tmp_path: Path) -> None:
    """bcc builds a classic tracepoint's argument struct from tracefs, mounted here in a
    private mount namespace (the host's mounts stay untouched); both loaders then attach
    the tracepoint programs and agree."""
    script = tmp_path / "tp.py"
    script.write_text(
        "import json, subprocess\n"
        "from pathlib import Path\n"
        "from tests.integration.test_bcc_fallback import Settings\n"
        "from node_agent.bcc_loader import load_probe_bcc\n"
        "from node_agent.loader import load_probe\n"
        f"s = Settings(bpf_dir=Path({str(bcc_ready)!r}), ring_bytes=1 << 20)\n"
        "with load_probe('process', s) as a, load_probe_bcc('process', s) as b:\n"
        "    child = subprocess.Popen(['/bin/sh', '-c', 'exit 3', 'tp-marker'])\n"
        "    child.wait()\n"
        "    out = {}\n"
        "    for name, p in (('libbpf', a), ('bcc', b)):\n"
        "        ex, xt = p.rings['process_exec'].drain(), p.rings['process_exit'].drain()\n"
        "        e, x = ex[ex['pid'] == child.pid][0], xt[xt['pid'] == child.pid][0]\n"
        "        out[name] = {'attached': p.attached, 'filename': e['filename'].decode(),\n"
        "                     'args': e['args'].decode(), 'code': int(x['exit_code'])}\n"
        "print(json.dumps(out))\n"
    )
    result = run_in_private_tracefs(
        [sys.executable, str(script)], "bcc fallback", timeout=120, env={"PYTHONPATH": str(REPO)}
    )
    assert (
        result["bcc"]
        == result["libbpf"]
        == {
            "attached": {
                "sched/sched_process_exec": "tracepoint__sched__sched_process_exec",
                "sched/sched_process_exit": "tracepoint__sched__sched_process_exit",
            },
            "filename": "/bin/sh",  # through the tracepoint's __data_loc
            "args": "/bin/sh\0-c\0exit 3\0tp-marker",
            "code": 3,
        }
    )


def test_layout_mismatch_and_missing_pieces_are_reported(bcc_ready: Path, tmp_path: Path) -> None:
    settings = Settings(bpf_dir=bcc_ready)
    # a record field moved in the bcc source: the compile refuses, naming the field
    moved = tmp_path / "bpf"
    shutil.copytree(bcc_ready, moved, ignore=shutil.ignore_patterns("*.bcc.c", "vmlinux.h"))
    header = (moved / "process.h").read_text()
    uid, args_len = "\t__u32 uid;\n", "\t__u32 args_len; /* bytes of argv in args[] */\n"
    assert uid + args_len in header
    (moved / "process.h").write_text(header.replace(uid + args_len, args_len + uid))
    shutil.copy(bcc_ready / "process.bcc.c", moved)
    with pytest.raises(BccUnavailable) as caught:
        load_probe_bcc("process", Settings(bpf_dir=moved))
    assert "process_exec_event.uid offset" in caught.value.log and "could not compile" in caught.value.reason

    # a kernel field that does not exist: refused before compiling, with the field
    broken = get_probe("process")
    assert broken.bcc is not None
    fields = (*broken.bcc.kernel_fields, KernelField("task_struct", "no_such_field", 8))
    bad = dataclasses.replace(broken, bcc=dataclasses.replace(broken.bcc, kernel_fields=fields))
    with pytest.raises(BccUnavailable, match="task_struct has no member 'no_such_field'"):
        load_probe_bcc(bad, settings)
    wrong = KernelField("task_struct", "tgid", 8)
    bad = dataclasses.replace(broken, bcc=dataclasses.replace(broken.bcc, kernel_fields=(wrong,)))
    with pytest.raises(BccUnavailable, match=r"task_struct.tgid is 4 bytes"):
        load_probe_bcc(bad, settings)

    # a hook whose programs bcc cannot attach: tp_btf
    tp_btf = dataclasses.replace(broken, hooks=(Hook("sched/sched_switch", ("tp_btf__sched_switch",)),))
    with pytest.raises(Exception, match="classic and raw tracepoints only"):
        load_probe_bcc(tp_btf, settings)

    # a probe without a bcc variant, and a knob the probe does not have
    nobcc = dataclasses.replace(broken, bcc=None, bcc_unavailable="needs tp_btf for struct sock")
    with pytest.raises(BccUnavailable, match="unavailable: needs tp_btf for struct sock"):
        load_probe_bcc(nobcc, settings)
    with pytest.raises(ProbeConfigError, match="no knob 'nope'"):
        load_probe_bcc("process", settings, rodata={"nope": 1})
    # a table knob (an array in .rodata with libbpf) needs the probe's BccVariant.macros
    with pytest.raises(ProbeConfigError, match="knob 'args_max' is a table; its bcc variant takes none"):
        load_probe_bcc("process", settings, rodata={"args_max": b"\0" * 4})  # type: ignore[dict-item]


def test_without_kernel_btf_the_kernels_own_headers_are_required(bcc_ready: Path) -> None:
    """Offsets from headers (as on a kernel without BTF): this machine has none for its
    kernel, which is what such a node is told."""
    release = os.uname().release
    if Path(f"/lib/modules/{release}/build/include/linux/kconfig.h").exists():
        pytest.skip("this machine has kernel headers: the no-headers message cannot be shown")
    with pytest.raises(BccUnavailable) as caught:
        load_probe_bcc("process", Settings(bpf_dir=bcc_ready), kernel_btf=None)
    assert f"no kernel headers for {release}" in caught.value.reason
    assert "linux-headers-$(uname -r)" in str(caught.value)


def test_loader_setting_selects(bcc_ready: Path) -> None:
    with load_selected("process", Settings(bpf_dir=bcc_ready, loader="bcc", ring_bytes=1 << 16)) as p:
        assert isinstance(p, BccProbe)
    with load_selected("process", Settings(bpf_dir=bcc_ready, loader="auto", ring_bytes=1 << 16)) as p:
        assert isinstance(p, LoadedProbe)  # this kernel has BTF


def test_check_reports_every_probe_and_loader(bcc_ready: Path) -> None:
    lines, code = check(AgentOptions(bpf_dir=bcc_ready, loader="bcc"), ["process"])
    assert lines[0].startswith(f"kernel {os.uname().release} ") and "btf yes" in lines[0]
    assert lines[1].startswith("loader bcc: bcc")
    assert [line.split()[:3] for line in lines[2:]] == [["process", "libbpf", "ok:"], ["process", "bcc", "ok:"]]
    assert code == 0
    lines, _ = check(AgentOptions(bpf_dir=bcc_ready))
    names = {line.split()[0] for line in lines[2:]}
    assert len(lines) - 2 == 2 * len(names)  # one line per probe and loader
    for line in lines[2:]:
        name, loader, verdict = line.split(maxsplit=2)
        probe = get_probe(name)
        if loader == "bcc" and probe.bcc is None:
            assert verdict.startswith("unavailable: ") and len(verdict) > len("unavailable: ")
    verdicts = {(line.split()[0], line.split()[1]): line.split(maxsplit=2)[2] for line in lines[2:]}
    for name in ("process", "file_open", "fatal_signals", "oom_kills", "tcp_connections"):  # with a bcc variant
        assert verdicts[name, "bcc"].startswith("ok: "), verdicts
    # under bcc, tcp's tp_btf programs run as the raw tracepoints of the same events, and say so
    assert "via tp_btf__tcp_destroy_sock (as raw tracepoint tcp_destroy_sock)" in verdicts["tcp_connections", "bcc"]


def test_run_stores_rows_through_bcc(bcc_ready: Path, tmp_path: Path) -> None:
    """The whole path with --loader bcc: kernel -> bcc programs -> rings -> batches -> ClickHouse."""
    data_dir = tmp_path / "store"
    run = FleetscopeProcess(
        "run", "--data-dir", str(data_dir), "--bpf-dir", str(bcc_ready), "--loader", "bcc",
        "--status", "log", "--status-interval", "1s", log=tmp_path / "run.log",
    )  # fmt: skip
    with run:
        run.wait_for_log("probe process running (bcc)", 120)
        marker = f"fsbcc-{uuid.uuid4().hex[:12]}"
        expected = spawn_markers(500, marker)
        run.stop(signal.SIGINT)
    assert run.returncode == 0, run.log_text()
    assert_marker_rows(data_dir, marker, expected)


def test_nested_member_offsets_from_kernel_btf() -> None:
    """mm_struct's fields live in an anonymous struct: Btf.member finds them."""
    vmlinux = Path("/sys/kernel/btf/vmlinux")
    if not vmlinux.exists():
        require_real("no kernel BTF")
    btf = Btf.from_file(vmlinux)
    start, end = btf.member("mm_struct", "arg_start"), btf.member("mm_struct", "arg_end")
    assert (start.size, end.size, end.offset - start.offset) == (8, 8, 8)
    assert btf.member("task_struct", "tgid").size == 4
    assert PROBE.bcc is not None and all(f.struct and f.field for f in PROBE.bcc.kernel_fields)


def as_rows(records: np.ndarray, skip: tuple[str, ...] = ("time_ns",)) -> list[tuple[object, ...]]:
    """Every field of the records but skip (times differ by the programs' run order), as
    sorted plain tuples."""
    fields = [f for f in records.dtype.names or () if f not in skip]
    return sorted(tuple(r[f].item() if np.ndim(r[f]) == 0 else r[f].tobytes() for f in fields) for r in records)


@pytest.fixture
def open_dirs() -> Iterator[tuple[Path, Path]]:
    """A watched directory, its name not ASCII (prefix bytes above 0x7f), and an unwatched
    one; short paths, as a prefix is at most 64 bytes."""
    top = Path(f"/tmp/fs-bcc-{uuid.uuid4().hex[:12]}")
    watched, outside = top / "wätched", top / "outside"
    watched.mkdir(parents=True)
    outside.mkdir()
    yield watched, outside
    shutil.rmtree(top)


def test_file_open_rows_are_identical_through_both_loaders(bcc_ready: Path, open_dirs: tuple[Path, Path]) -> None:
    watched, outside = open_dirs
    top = watched.parent
    prefixes = (f"{top}/elsewhere/", f"{watched}/")  # the second one matches
    settings = Settings(bpf_dir=bcc_ready, ring_bytes=1 << 20, file_open_prefixes=prefixes)
    with load_probe("file_open", settings) as libbpf, load_probe_bcc("file_open", settings) as bcc:
        assert bcc.attached == libbpf.attached == {"syscalls/sys_exit_openat": "raw_tp__sys_exit"}
        for p in (libbpf, bcc):
            p.rings["file_open"].drain()
        opens = open_everything(watched, outside, n_missing=20)
        long = f"{watched}/{'l' * 200}/{'m' * 100}"  # missing, and longer than path[]
        with pytest.raises(FileNotFoundError):
            os.open(long, os.O_RDONLY)
        got = {}
        for name, p in (("libbpf", libbpf), ("bcc", bcc)):
            records = p.rings["file_open"].drain()
            paths = np.char.decode(records["path"].astype("S256"), "utf-8", "replace")
            got[name] = records[(records["pid"] == os.getpid()) & (np.char.find(paths, top.name) >= 0)]
            assert p.stats()["file_open"]["dropped"] == 0
    assert as_rows(got["bcc"]) == as_rows(got["libbpf"])

    # and they are right: failures and the opens under the prefix, each once
    rows = got["bcc"]
    cut = rows[(rows["rflags"] & 1) == 1]
    assert cut["path"].tolist() == [long.encode()[:255]] and cut["ret"].tolist() == [-2]
    recorded = sorted(rows_as_opened(rows[(rows["rflags"] & 1) == 0]), key=str)
    assert recorded == sorted(captured(opens, (f"{watched}/",), capture_all=False), key=str)
    assert {o.syscall for o in recorded} >= {"openat"}

    # every open, of this process only: the capture_all and pid knobs reach bcc as macros
    everything = dataclasses.replace(settings, file_open_all=True, filter_pid=os.getpid(), file_open_prefixes=())
    with load_probe_bcc("file_open", everything) as probe:
        probe.rings["file_open"].drain()
        fd = os.open(outside / "present", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        assert subprocess.call(["/bin/cat", str(outside / "present")]) == 0  # another process
        records = probe.rings["file_open"].drain()
    assert set(records["pid"].tolist()) == {os.getpid()}
    assert (str(outside / "present").encode(), fd) in set(
        zip(records["path"].tolist(), records["ret"].tolist(), strict=True)
    )


SI_USER, SI_TKILL, SEGV_MAPERR = 0, -6, 1


def test_fatal_signal_rows_are_identical_through_both_loaders(bcc_ready: Path) -> None:
    settings = Settings(bpf_dir=bcc_ready, ring_bytes=1 << 20)
    me = os.getpid()
    old = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, old[1]))  # no core files from the faults
    try:
        with load_probe("fatal_signals", settings) as libbpf, load_probe_bcc("fatal_signals", settings) as bcc:
            assert bcc.attached == libbpf.attached
            for p in (libbpf, bcc):
                p.rings["fatal_signals"].drain()
            # pid -> (signal, si_code, sender pid, comm)
            expected: dict[int, tuple[int, int, int, bytes]] = {}
            for sig in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT):
                child = started(["sleep", "30"], b"sleep")
                os.kill(child.pid, sig)
                assert child.wait() == -sig
                expected[child.pid] = (sig, SI_USER, me, b"sleep")
            for code, sig, si_code in ((SEGFAULT, signal.SIGSEGV, SEGV_MAPERR), ("import os\nos.abort()\n",
                                        signal.SIGABRT, SI_TKILL)):  # fmt: skip
                child = subprocess.Popen(py(code))
                assert child.wait() == -sig
                expected[child.pid] = (sig, si_code, child.pid, PYTHON_COMM)  # its own sender
            # no rows: another signal, a normal exit
            term = started(["sleep", "30"], b"sleep")
            term.terminate()
            assert term.wait() == -signal.SIGTERM
            assert subprocess.call(["/bin/true"]) == 0
            got = {name: p.rings["fatal_signals"].drain() for name, p in (("libbpf", libbpf), ("bcc", bcc))}
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, old)
    skip = ("time_ns", "delay_ns")
    ours = {name: r[r["ppid"] == me] for name, r in got.items()}
    assert as_rows(ours["bcc"], skip) == as_rows(ours["libbpf"], skip)
    by_pid = {int(r["pid"]): r for r in ours["bcc"]}
    assert sorted(by_pid) == sorted(expected)
    for pid, want in expected.items():
        r = by_pid[pid]
        assert (r["signal"], r["code"], r["sender_pid"], r["comm"], r["flags"]) == (*want, 2)


def test_oom_kill_rows_are_identical_through_both_loaders(bcc_ready: Path) -> None:
    """A process outgrowing a 20 MiB memory cgroup (as in test_oom_kills_probe): one row,
    the same through both loaders, and its SIGKILL from the kernel too."""
    settings = Settings(bpf_dir=bcc_ready, ring_bytes=1 << 16)
    with memory_cgroup(20 << 20) as cg:
        with (
            load_probe("oom_kills", settings) as libbpf,
            load_probe_bcc("oom_kills", settings) as bcc,
            load_probe_bcc("fatal_signals", settings) as deaths,
        ):
            assert bcc.attached == libbpf.attached == {"oom/mark_victim": "raw_tp__mark_victim"}
            for p in (libbpf, bcc, deaths):
                for ring in p.rings.values():
                    ring.drain()
            victim = cg.spawn_hog(oom_score_adj=500)
            assert victim.wait(60) == -signal.SIGKILL
            got = {name: p.rings["oom_kills"].drain() for name, p in (("libbpf", libbpf), ("bcc", bcc))}
            died = deaths.rings["fatal_signals"].drain()
        cgroup_id = os.stat(cg.v2_dir).st_ino
    mine = {name: r[r["pid"] == victim.pid] for name, r in got.items()}
    assert len(mine["bcc"]) == 1 and as_rows(mine["bcc"]) == as_rows(mine["libbpf"])
    r = mine["bcc"][0]
    assert (r["oom_score_adj"], r["cgroup_id"], r["trigger_pid"], r["uid"]) == (500, cgroup_id, victim.pid, 0)
    assert 8 << 10 <= r["anon_rss_kb"] <= 20 << 10 and r["total_vm_kb"] > r["anon_rss_kb"] and r["pgtables_kb"] > 0
    d = died[died["pid"] == victim.pid]
    assert (d["signal"].tolist(), d["code"].tolist(), d["sender_pid"].tolist()) == ([9], [0x80], [victim.pid])


def reset_and_refused() -> None:
    """A connection closed with linger 0 (a reset sent, and received by the other end) and a
    refused connect, on IPv4 loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        with pytest.raises(ConnectionResetError):
            accepted.recv(1)
        accepted.close()
        port = server.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port))


TCP_TIMES = ("time_ns", "duration_ns", "handshake_ns")  # each program reads the clock itself


def test_tcp_connection_rows_are_identical_through_both_loaders(bcc_ready: Path) -> None:
    """tcp_connections through bcc: the tp_btf hooks as raw tracepoints, the socket read at
    offsets from the kernel's BTF; every field but the times equals libbpf's."""
    settings = Settings(bpf_dir=bcc_ready, ring_bytes=1 << 20)
    with load_probe("tcp_connections", settings) as libbpf, load_probe_bcc("tcp_connections", settings) as bcc:
        assert bcc.attached == libbpf.attached
        assert set(bcc.attached.values()) == {
            "tp_btf__inet_sock_set_state", "tp_btf__tcp_receive_reset", "tp_btf__tcp_send_reset",
            "tp_btf__tcp_destroy_sock",
        }  # fmt: skip
        for p in (libbpf, bcc):
            p.rings["tcp_connections"].drain()
        with running_server(6) as (server, v4, v6):
            exchanges = run_exchanges(6, v4, v6)
        reset_and_refused()
        pids = [os.getpid(), server.pid]
        want = 2 * len(exchanges) + 2 + 1
        got: dict[str, list[np.ndarray]] = {"libbpf": [], "bcc": []}
        deadline = time.monotonic() + 30  # a record is written when the kernel destroys the socket
        while min(sum(np.isin(r["pid"], pids).sum() for r in got[n]) for n in got) < want:
            assert time.monotonic() < deadline, "connections missing"
            time.sleep(0.02)
            for name, p in (("libbpf", libbpf), ("bcc", bcc)):
                got[name].append(p.rings["tcp_connections"].drain())
        stats = {name: p.stats()["tcp_connections"] for name, p in (("libbpf", libbpf), ("bcc", bcc))}
    mine = {name: np.concatenate(parts) for name, parts in got.items()}
    mine = {name: r[np.isin(r["pid"], pids)] for name, r in mine.items()}
    assert len(mine["bcc"]) == want and as_rows(mine["bcc"], TCP_TIMES) == as_rows(mine["libbpf"], TCP_TIMES)
    assert stats["bcc"]["dropped"] == stats["libbpf"]["dropped"] == 0

    # and they are right: ports, byte counts, roles, resets, the refused connect
    r = mine["bcc"]
    # connections to different servers (or over IPv4 and IPv6) may get the same client port
    clients = {(int(x["family"]), int(x["local_port"]), int(x["remote_port"])): x for x in r[r["role"] == 1]}
    for e in exchanges:
        client = clients[e.family, e.client_port, e.server_port]
        assert (client["bytes_sent"], client["bytes_received"], client["family"]) == (e.sent, e.received, e.family)
        assert client["remote_port"] == e.server_port and client["pid"] == os.getpid()
    accepts = r[r["role"] == 2]
    assert sorted(accepts["bytes_received"].tolist()) == sorted([e.sent for e in exchanges] + [0])
    flags = sorted(int(f) for f in r["flags"] if f)
    assert flags == [2, 3, 4]  # reset received, refused (failed, by a reset), reset sent
    assert r[r["flags"] == 3]["error"].tolist() == [111]  # ECONNREFUSED


CLASSIC_PROBES = r"""
import dataclasses, json, os, signal, socket, subprocess, sys, time
from pathlib import Path
import numpy as np
from node_agent.bcc_loader import load_probe_bcc
from node_agent.loader import load_probe
from node_agent.probes import Hook, get_probe
from tests.integration.test_bcc_fallback import Settings, as_rows
from tests.integration.test_fatal_signals_probe import SEGFAULT, py
from tests.integration.test_tcp_connections import wait_until_sockets_destroyed
from tests.support.memcg import MemoryCgroup
from tests.support.opens import captured, open_everything

bpf_dir, watched, outside, v2_dir, *procs = sys.argv[1:]
watched, outside = Path(watched), Path(outside)
s = Settings(bpf_dir=Path(bpf_dir), ring_bytes=1 << 20, file_open_prefixes=(f"{watched}/",))
# oom_kills prefers raw_tp: its classic tracepoint alone
oom = get_probe("oom_kills")
oom = dataclasses.replace(oom, hooks=(Hook("oom/mark_victim", ("tracepoint__oom__mark_victim",)),))

def opens():
    done = open_everything(watched, outside, n_missing=10)
    return len(captured(done, (f"{watched}/",), capture_all=False)), lambda r: np.char.find(
        np.char.decode(r["path"].astype("S256"), "utf-8", "replace"), watched.parent.name) >= 0

def kills():
    pids = []
    for sig in (signal.SIGKILL, signal.SIGABRT):
        child = subprocess.Popen(["sleep", "30"])
        os.kill(child.pid, sig)
        child.wait()
        pids.append(child.pid)
    child = subprocess.Popen(py(SEGFAULT))
    child.wait()
    return 3, lambda r: np.isin(r["pid"], pids + [child.pid])

def oom_kill():
    hog = MemoryCgroup(tuple(map(Path, procs)), Path(v2_dir)).spawn_hog(oom_score_adj=300)
    assert hog.wait(60) == -9
    return 1, lambda r: r["pid"] == hog.pid

def connections():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        client.sendall(b"x" * 100)
        accepted.recv(100)
        pair = client.getsockname()[1], accepted.getsockname()[1]
        client.close()
        accepted.close()
        port = server.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port))  # refused: its close() destroys the socket at once
    except ConnectionRefusedError:
        pass
    wait_until_sockets_destroyed([pair])  # a record is written when the kernel destroys the socket
    return 3, lambda r: r["pid"] == os.getpid()

out = {}
for probe, act, skip in (("file_open", opens, ("time_ns",)), ("fatal_signals", kills, ("time_ns", "delay_ns")),
                         (oom, oom_kill, ("time_ns",)),
                         ("tcp_connections", connections, ("time_ns", "duration_ns", "handshake_ns"))):
    name = probe if isinstance(probe, str) else probe.name
    with load_probe(probe, s) as a, load_probe_bcc(probe, s) as b:
        for p in (a, b):
            next(iter(p.rings.values())).drain()
        expected, ours = act()
        out[name] = {"expected": expected}
        for loader, p in (("libbpf", a), ("bcc", b)):
            rec = next(iter(p.rings.values())).drain()
            rows = as_rows(rec[ours(rec)], skip)
            out[name][loader] = {"attached": p.attached, "rows": [repr(r) for r in rows]}
print(json.dumps(out))
"""


def test_classic_tracepoints_of_every_bcc_probe_in_a_private_tracefs(
    bcc_ready: Path, open_dirs: tuple[Path, Path]
) -> None:
    """With tracefs (private mount namespace), bcc compiles the classic tracepoint programs of
    file_open, fatal_signals, oom_kills and tcp_connections from the format files; their rows
    equal libbpf's."""
    watched, outside = open_dirs
    with memory_cgroup(20 << 20) as cg:
        result = run_in_private_tracefs(
            [sys.executable, "-c", CLASSIC_PROBES, str(bcc_ready), str(watched), str(outside), str(cg.v2_dir),
             *map(str, cg.procs)],
            "bcc fallback", timeout=120, env={"PYTHONPATH": str(REPO)},
        )  # fmt: skip
    for name, got in result.items():
        assert got["bcc"] == got["libbpf"], name
        assert len(got["bcc"]["rows"]) == got["expected"] > 0, name
        assert all(prog.startswith("tracepoint__") for prog in got["bcc"]["attached"].values()), got
    assert len(result["file_open"]["bcc"]["attached"]) == 8  # enter and exit of 4 syscalls
    assert set(result) == {"file_open", "fatal_signals", "oom_kills", "tcp_connections"}
