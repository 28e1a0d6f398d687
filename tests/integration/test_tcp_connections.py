"""The tcp_connections probe in the running kernel: loopback connections this test makes
(IPv4 and IPv6, to a server process it runs) arrive as exactly one connect and one accept
row each, with addresses, ports, owners, cgroups and byte counts; a refused connect, a
reset, a SYN timeout with its retransmission and a full socket table are rows or counted
drops; and the rows reach fleet.tcp_connections through `fleetscope run`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fleetscope import native
from fleetscope.codec import SCHEMAS, StringColumn, decode_batch, encode_batch
from fleetscope.v1 import batch_pb2
from node_agent.loader import LoadedProbe, cgroup2_mount, load_probe
from node_agent.probes import tcp_connections
from tests.support.procs import FleetscopeProcess
from tests.support.real import require_real
from tests.support.tracefs import run_in_private_tracefs

REPO = Path(__file__).resolve().parents[2]
BPF_DIR = REPO / "bpf"
CONNECT, ACCEPT = 1, 2
FAILED, RESET_RECEIVED, RESET_SENT, NO_OWNER = 1, 2, 4, 8
V4_LOOPBACK = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")
V6_LOOPBACK = socket.inet_pton(socket.AF_INET6, "::1")


@dataclass(frozen=True)
class Settings:
    """The agent settings the loader reads (fleetscope.config.AgentOptions in the agent)."""

    bpf_dir: Path = BPF_DIR
    ring_bytes: int = 4 << 20
    filter_pid: int = 0
    filter_cgroup: str = ""
    loader: str = "libbpf"
    tcp_max_connections: int = 65536


# --- a server process: accepts on 127.0.0.1 and ::1, answers each request as asked ---------

# Request: "<III" (request bytes including this header, reply bytes, server closes first),
# then filler up to the request size. The server reads the whole request, sends the reply,
# and either closes at once or waits for the client's FIN first.
SERVER = r"""
import json, selectors, socket, struct, sys
n = int(sys.argv[1])
listeners = []
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    s = socket.socket(fam)
    s.bind((host, 0))
    s.listen(64)
    listeners.append(s)
print(json.dumps([s.getsockname()[1] for s in listeners]), flush=True)
sel = selectors.DefaultSelector()
for s in listeners:
    sel.register(s, selectors.EVENT_READ)
def read(c, k):
    buf = b""
    while len(buf) < k:
        b = c.recv(min(65536, k - len(buf)))
        if not b:
            raise SystemExit("short request")
        buf += b
    return buf
done = 0
while done < n:
    for key, _ in sel.select():
        c, _ = key.fileobj.accept()
        req, reply, server_first = struct.unpack("<III", read(c, 12))
        read(c, req - 12)
        c.sendall(b"r" * reply)
        if not server_first:
            while c.recv(65536):
                pass
        c.close()
        done += 1
print("done", flush=True)
"""


@dataclass(frozen=True)
class Exchange:
    """One connection the client made: what each end must report."""

    family: int  # 4 or 6
    client_port: int
    server_port: int
    sent: int  # client -> server payload bytes
    received: int  # server -> client payload bytes


@contextmanager
def running_server(n: int, cgroup: Path | None = None) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """The server process for n connections (moved into cgroup first, if given): yields it
    and its IPv4 and IPv6 ports; it must have served them all when the block ends."""
    cmd = [sys.executable, "-c", SERVER, str(n)]
    if cgroup is not None:
        cmd = ["/bin/sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        try:
            v4, v6 = json.loads(proc.stdout.readline())
            yield proc, v4, v6
            assert proc.stdout.readline() == "done\n"
            assert proc.wait(10) == 0
        finally:
            proc.kill()


def exchange(family: int, port: int, sent: int, received: int, server_first: bool) -> Exchange:
    """Connect, send `sent` bytes, read `received` bytes, close in the chosen order."""
    host = "127.0.0.1" if family == 4 else "::1"
    with socket.create_connection((host, port)) as c:
        c.sendall(struct.pack("<III", sent, received, server_first) + b"q" * (sent - 12))
        got = 0
        if server_first:
            c.shutdown(socket.SHUT_WR)  # the server sees the whole request, replies, closes
            while b := c.recv(65536):
                got += len(b)
        else:
            while got < received:
                got += len(c.recv(received - got))
        assert got == received
        return Exchange(family, c.getsockname()[1], port, sent, received)


def run_exchanges(n: int, v4: int, v6: int) -> list[Exchange]:
    """n connections, alternating IPv4/IPv6 and who closes first, distinct byte counts."""
    return [
        exchange(4 if i % 2 == 0 else 6, v4 if i % 2 == 0 else v6, 12 + 997 * i, 1499 * i + 1, i % 4 < 2)
        for i in range(n)
    ]


def wait_until_sockets_destroyed(pairs: Collection[tuple[int, int]], timeout: float = 30.0) -> None:
    """Wait until the kernel has destroyed every socket of these connections (port pairs,
    either end), which is when the probe writes their rows (tcp:tcp_destroy_sock). Both ends
    must have been closed by their processes.

    A closed socket not yet destroyed (FIN-WAIT, CLOSING, LAST-ACK: final segments not yet
    processed) is listed in /proc/net/tcp{,6} of this netns. An end that reached TIME-WAIT
    was destroyed as it did: a timewait socket took its place, listed with timer 3 in the
    `tr` column whatever state it shows (an orphan still waiting for the peer's FIN shows
    FIN-WAIT-2)."""
    ends = {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                local, remote = int(f[1].rpartition(":")[2], 16), int(f[2].rpartition(":")[2], 16)
                if (local, remote) in ends and f[5].partition(":")[0] != "03":
                    alive.append(line)
        if not alive:
            return
        assert time.monotonic() < deadline, f"sockets not destroyed within {timeout}s:\n" + "\n".join(alive)
        time.sleep(0.02)


# --- probe helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpf_dir() -> Path:
    """bpf/ with tcp_connections.bpf.o built, on a kernel that can load it."""
    if os.geteuid() != 0:
        require_real("tcp_connections probe: needs root (CAP_BPF, CAP_PERFMON) to load eBPF")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        require_real("tcp_connections probe: no kernel BTF at /sys/kernel/btf/vmlinux (CO-RE)")
    for tool in ("make", "clang", "bpftool"):
        if shutil.which(tool) is None:
            require_real(f"tcp_connections probe: building bpf/ needs `{tool}` (apt install clang bpftool)")
    build = subprocess.run(
        ["make", "-s", "-C", str(BPF_DIR), "tcp_connections.bpf.o", "process.bpf.o"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    return BPF_DIR


@pytest.fixture
def probe(bpf_dir: Path) -> Iterator[LoadedProbe]:
    with load_probe("tcp_connections", Settings(bpf_dir=bpf_dir)) as p:
        p.rings["tcp_connections"].drain()
        yield p


def collect(probe: LoadedProbe, want: Callable[[np.ndarray], bool], timeout: float = 30.0) -> np.ndarray:
    """Drain the ring until want(all records so far) holds, then once more a little later
    (so a duplicate would show); records arrive when the kernel destroys a socket, which
    may lag the close() a little (final ACK, orphan processing)."""
    ring = probe.rings["tcp_connections"]
    parts: list[np.ndarray] = []
    deadline = time.monotonic() + timeout
    while True:
        parts.append(ring.drain())
        if want(np.concatenate(parts)) or time.monotonic() > deadline:
            time.sleep(0.1)
            parts.append(ring.drain())
            return np.concatenate(parts)
        time.sleep(0.02)


def strings(column: tuple[bytes, np.ndarray, np.ndarray]) -> list[bytes]:
    """A pre-encoded string column (data, offsets, index) as its value per row."""
    values = StringColumn(*column).values
    return [values[i] for i in column[2]]


def addr(field: np.ndarray) -> bytes:
    return np.ascontiguousarray(field).tobytes()


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def comm_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/comm").read_bytes().strip()


def netns_inode(pid: int | str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@pytest.fixture
def cgroups() -> Iterator[tuple[Path, Path]]:
    """Two kubelet-shaped cgroup v2 leaves, client and server; this process moves into the
    client one for the test."""
    root = cgroup2_mount()
    if not (root / "cgroup.procs").exists():
        require_real("tcp_connections probe: no cgroup v2 mount")
    home = root / next(
        line.split("::", 1)[1] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")
    ).lstrip("/")
    top = root / f"fleetscope-tcp-{uuid.uuid4().hex[:8]}.slice"
    client = top / f"kubepods-pod{uuid.uuid4()}.slice" / f"cri-containerd-{uuid.uuid4().hex}.scope"
    server = top / f"kubepods-pod{uuid.uuid4()}.slice" / f"cri-containerd-{uuid.uuid4().hex}.scope"
    client.mkdir(parents=True)
    server.mkdir(parents=True)
    try:
        (client / "cgroup.procs").write_text(str(os.getpid()))
        yield client, server
    finally:
        (home / "cgroup.procs").write_text(str(os.getpid()))
        for d in (client, client.parent, server, server.parent, top):
            d.rmdir()


# --- the probe in the kernel -------------------------------------------------------------------

N = 40


@pytest.mark.root
def test_every_connection_is_one_connect_and_one_accept_row(probe: LoadedProbe, cgroups: tuple[Path, Path]) -> None:
    client_cg, server_cg = cgroups
    me, t0 = os.getpid(), boot_ns()
    with running_server(N, server_cg) as (server, v4, v6):
        server_comm = comm_of(server.pid)
        done = run_exchanges(N, v4, v6)

    def mine(rec: np.ndarray) -> np.ndarray:
        ports = np.isin(rec["remote_port"], (v4, v6)) & (rec["role"] == CONNECT)
        return rec[ports | (np.isin(rec["local_port"], (v4, v6)) & (rec["role"] == ACCEPT))]

    rec = mine(collect(probe, lambda r: len(mine(r)) >= 2 * N))
    t1 = boot_ns()
    assert len(rec) == 2 * N
    assert rec.dtype.itemsize == 128
    # an IPv4 and an IPv6 connection may get the same client port: the family is part of the key
    clients = {(int(r["family"]), int(r["local_port"])): r for r in rec[rec["role"] == CONNECT]}
    servers = {(int(r["family"]), int(r["remote_port"])): r for r in rec[rec["role"] == ACCEPT]}
    assert sorted(clients) == sorted(servers) == sorted((x.family, x.client_port) for x in done)
    host_ns = netns_inode()
    for x in done:
        c, s = clients[x.family, x.client_port], servers[x.family, x.client_port]
        loop = V4_LOOPBACK if x.family == 4 else V6_LOOPBACK
        for r in (c, s):
            assert r["family"] == x.family
            assert addr(r["local_addr"]) == addr(r["remote_addr"]) == loop
            assert r["flags"] == 0 and r["error"] == 0 and r["retransmits"] == 0
            assert r["srtt_us"] > 0 and r["netns"] == host_ns
            assert t0 <= r["time_ns"] and r["time_ns"] + r["duration_ns"] <= t1
        # the client: connect()'s caller and cgroup, its bytes as sent
        assert c["remote_port"] == x.server_port
        assert (c["pid"], c["comm"], c["cgroup_id"]) == (me, comm_of(me), os.stat(client_cg).st_ino)
        assert (c["bytes_sent"], c["bytes_received"]) == (x.sent, x.received)
        assert 0 < c["handshake_ns"] < c["duration_ns"]
        # the server: the accepting process, the listener's cgroup, the mirror of the bytes
        assert s["local_port"] == x.server_port
        assert (s["pid"], s["comm"], s["cgroup_id"]) == (server.pid, server_comm, os.stat(server_cg).st_ino)
        assert (s["bytes_sent"], s["bytes_received"]) == (x.received, x.sent)
        assert s["handshake_ns"] == 0
        assert c["time_ns"] < s["time_ns"]  # SYN sent before the handshake completed
    stats = probe.stats()["tcp_connections"]
    assert stats["dropped"] == 0 and stats["emitted"] >= 2 * N


@pytest.mark.root
def test_refused_connects_are_failed_rows(probe: LoadedProbe) -> None:
    me = os.getpid()
    ports = {}
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as closed:  # a port nobody listens on
            closed.bind((host, 0))
            port = closed.getsockname()[1]
        with socket.socket(family) as s, pytest.raises(ConnectionRefusedError):
            s.connect((host, port))
        ports[port] = 4 if family == socket.AF_INET else 6

    def mine(rec: np.ndarray) -> np.ndarray:
        return rec[np.isin(rec["remote_port"], list(ports)) & (rec["pid"] == me)]

    rec = mine(collect(probe, lambda r: len(mine(r)) >= 2))
    assert len(rec) == 2
    for r in rec:
        assert r["role"] == CONNECT and r["family"] == ports[int(r["remote_port"])]
        assert r["flags"] == FAILED | RESET_RECEIVED  # the RST is the refusal
        assert r["error"] == errno.ECONNREFUSED
        assert r["bytes_sent"] == r["bytes_received"] == r["handshake_ns"] == 0
        assert r["local_port"] != 0 and r["comm"] == comm_of(me)
    cols = tcp_connections.columns(rec, 0)
    assert strings(cols["error"]) == [b"ECONNREFUSED"] * 2
    assert strings(cols["reset"]) == [b"received"] * 2 and cols["failed"].tolist() == [1, 1]


@pytest.mark.root
def test_linger_zero_close_is_a_reset_on_both_ends(probe: LoadedProbe) -> None:
    """SO_LINGER 0: close() sends an RST after the socket entered TCP_CLOSE; the peer's
    blocked recv() fails with ECONNRESET and its close() destroys the socket, which is
    when the accepting thread is seen as the owner."""
    me = os.getpid()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[BaseException] = []
    read = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(100, socket.MSG_WAITALL) == b"x" * 100
            read.set()
            try:
                conn.recv(100)
            except ConnectionResetError as e:
                seen.append(e)

    t = threading.Thread(target=serve)
    t.start()
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"x" * 100)
    # the server has read the request; whether the RST finds it blocked in recv() or not yet
    # in it, that recv() fails with ECONNRESET (sk_err is set and nothing is left to read)
    assert read.wait(30)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client_port = c.getsockname()[1]
    c.close()
    t.join(5)
    listener.close()
    assert len(seen) == 1

    def mine(rec: np.ndarray) -> np.ndarray:
        return rec[(rec["remote_port"] == port) | (rec["local_port"] == port)]

    rec = mine(collect(probe, lambda r: len(mine(r)) >= 2))
    assert len(rec) == 2
    client = rec[rec["role"] == CONNECT][0]
    server = rec[rec["role"] == ACCEPT][0]
    assert client["local_port"] == server["remote_port"] == client_port
    assert client["flags"] == RESET_SENT and client["error"] == 0
    assert client["bytes_sent"] == 100 and client["pid"] == me
    assert server["flags"] == RESET_RECEIVED and server["error"] == errno.ECONNRESET
    assert server["bytes_received"] == 100
    assert server["pid"] == me  # taken at the close() that destroyed the socket
    cols = tcp_connections.columns(np.stack([client, server]), 0)
    assert strings(cols["reset"]) == [b"sent", b"received"]
    assert strings(cols["error"]) == [b"", b"ECONNRESET"]
    assert cols["owner_known"].tolist() == [1, 1]


# --- a private network namespace with a black hole: SYNs go out a veth and nowhere -------------

BLACKHOLE = """
ip link set lo up
ip link add fs0 type veth peer name fs1
ip addr add 10.77.0.1/24 dev fs0
ip link set fs0 up
ip link set fs1 up
ip neigh replace 10.77.0.2 lladdr 02:00:00:00:00:02 dev fs0 nud permanent
exec "$@"
"""


def in_blackhole_netns(script: str, *args: str) -> subprocess.Popen[str]:
    """Run python -c script in a new network namespace where 10.77.0.2 swallows packets."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            require_real(f"tcp_connections probe: the black-hole test needs `{tool}` (util-linux, iproute2)")
    return subprocess.Popen(
        ["unshare", "--net", "/bin/sh", "-ec", BLACKHOLE, "sh", sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


SYN_TIMEOUT = r"""
import errno, socket, sys
sys.stdin.readline()
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 100)  # give up at the first RTO (1 s)
try:
    s.connect(("10.77.0.2", 9))
except OSError as e:
    print(errno.errorcode[e.errno], s.getsockname()[1], flush=True)
s.close()
"""


@pytest.mark.root
def test_syn_timeout_is_a_failed_row_with_its_retransmission(probe: LoadedProbe) -> None:
    """The SYN is retransmitted once at the initial RTO (1 s), then TCP_USER_TIMEOUT ends
    the attempt: a failed row with ETIMEDOUT and the retransmitted SYN counted."""
    proc = in_blackhole_netns(SYN_TIMEOUT)
    try:
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        proc.kill()
    if proc.returncode and "Operation not permitted" in err:
        require_real(f"tcp_connections probe: cannot set up a network namespace: {err.strip()}")
    assert proc.returncode == 0, err
    name, local_port = out.split()
    assert name == "ETIMEDOUT"

    def mine(rec: np.ndarray) -> np.ndarray:
        return rec[rec["pid"] == proc.pid]

    rec = mine(collect(probe, lambda r: len(mine(r)) >= 1))
    assert len(rec) == 1
    r = rec[0]
    assert r["role"] == CONNECT and r["flags"] == FAILED and r["error"] == errno.ETIMEDOUT
    assert r["retransmits"] >= 1  # the SYN, through tcp_sock.total_retrans at close
    assert r["local_port"] == int(local_port) and r["remote_port"] == 9
    assert addr(r["local_addr"]) == socket.inet_pton(socket.AF_INET6, "::ffff:10.77.0.1")
    assert addr(r["remote_addr"]) == socket.inet_pton(socket.AF_INET6, "::ffff:10.77.0.2")
    assert r["netns"] != netns_inode() and r["comm"] == Path(sys.executable).name.encode()[:15]
    assert r["duration_ns"] >= 900_000_000


HOLD_SYNS = r"""
import socket, sys
sys.stdin.readline()
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("10.77.0.2", 9))  # SYN_SENT until closed
    socks.append(s)
print("open", flush=True)
sys.stdin.readline()
for s in socks:
    s.close()
"""


@pytest.mark.root
def test_a_full_socket_table_counts_drops(bpf_dir: Path) -> None:
    """tcp_max_connections bounds the per-socket table; a connection that finds it full
    gets no row and is counted as emitted and dropped, so emitted == read + dropped."""
    n, room = 10, 4
    with in_blackhole_netns(HOLD_SYNS, str(n)) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        settings = Settings(bpf_dir=bpf_dir, filter_pid=proc.pid, tcp_max_connections=room)
        with load_probe("tcp_connections", settings) as probe:
            ring = probe.rings["tcp_connections"]
            read = len(ring.drain())
            before = probe.stats()["tcp_connections"]
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "open\n"
            proc.stdin.write("close\n")
            proc.stdin.close()
            assert proc.wait(10) == 0
            rec = collect(probe, lambda r: len(r[r["pid"] == proc.pid]) >= room, timeout=2)
            read += len(rec)
            probe.detach()
            read += len(ring.drain())
            after = probe.stats()["tcp_connections"]
        if proc.poll() is None:
            proc.kill()
    # the pid filter: connects are filtered at connect(), accepted sockets at their owner
    assert set(rec["pid"].tolist()) <= {proc.pid}
    mine = rec[rec["pid"] == proc.pid]
    # accepted sockets elsewhere on the host may hold slots for a while: at most `room` rows
    assert 0 < len(mine) <= room
    assert np.all(mine["flags"] == FAILED) and np.all(mine["error"] == 0)  # closed while connecting
    assert after["dropped"] - before["dropped"] >= n - len(mine)
    assert after["emitted"] == read + after["dropped"]


@pytest.mark.root
def test_the_classic_tracepoints_attach_where_tracefs_is_mounted(bpf_dir: Path, tmp_path: Path) -> None:
    """The tracepoint programs are preferred; a private mount namespace with tracefs runs
    them (the host's mounts stay untouched) and they produce the same rows."""
    script = tmp_path / "tp.py"
    script.write_text(
        "import json, socket, time\n"
        "import numpy as np\n"
        "from dataclasses import dataclass\n"
        "from pathlib import Path\n"
        "from node_agent.loader import load_probe\n"
        "@dataclass(frozen=True)\n"
        "class Settings:\n"
        f"    bpf_dir: Path = Path({str(bpf_dir)!r})\n"
        "    ring_bytes: int = 1 << 20\n"
        "    filter_pid: int = 0\n"
        '    filter_cgroup: str = ""\n'
        "    tcp_max_connections: int = 1024\n"
        "with load_probe('tcp_connections', Settings()) as p:\n"
        "    l = socket.create_server(('127.0.0.1', 0))\n"
        "    port = l.getsockname()[1]\n"
        "    c = socket.create_connection(('127.0.0.1', port))\n"
        "    s, _ = l.accept()\n"
        "    c.sendall(b'a' * 1000); s.recv(1000, socket.MSG_WAITALL); s.sendall(b'b' * 10)\n"
        "    c.recv(10, socket.MSG_WAITALL); c.close(); s.close(); l.close()\n"
        "    def mine(r):\n"
        "        return r[(r['remote_port'] == port) | (r['local_port'] == port)]\n"
        "    r, deadline = mine(p.rings['tcp_connections'].drain()), time.monotonic() + 30\n"
        "    while len(r) < 2 and time.monotonic() < deadline:  # written as the sockets are destroyed\n"
        "        time.sleep(0.02)\n"
        "        r = np.concatenate([r, mine(p.rings['tcp_connections'].drain())])\n"
        "    time.sleep(0.1)  # and once more, so that a duplicate would show\n"
        "    r = np.concatenate([r, mine(p.rings['tcp_connections'].drain())])\n"
        "    print(json.dumps({'attached': p.attached, 'rows': sorted(\n"
        "        [int(x['role']), int(x['bytes_sent']), int(x['bytes_received'])] for x in r)}))\n"
    )
    result = run_in_private_tracefs([sys.executable, str(script)], "tcp_connections probe")
    assert result["attached"] == {
        "sock/inet_sock_set_state": "tracepoint__sock__inet_sock_set_state",
        "tcp/tcp_receive_reset": "tracepoint__tcp__tcp_receive_reset",
        "tcp/tcp_send_reset": "tracepoint__tcp__tcp_send_reset",
        "tcp/tcp_destroy_sock": "tracepoint__tcp__tcp_destroy_sock",
    }
    assert result["rows"] == [[CONNECT, 1000, 10], [ACCEPT, 10, 1000]]


# --- columns, wire format and table (no kernel) -------------------------------------------------


def test_columns_round_trip_to_the_native_ipv6_block() -> None:
    """Addresses travel as 4 fixed32 per row holding the 16 address bytes and become
    ClickHouse IPv6 without a Python object per row."""
    from node_agent.btf import Btf

    dtype = Btf.from_file(BPF_DIR / "tcp_connections.bpf.o").struct_dtype("tcp_connection_event")
    rec = np.zeros(3, dtype)
    addrs = [V4_LOOPBACK, V6_LOOPBACK, socket.inet_pton(socket.AF_INET6, "2001:db8::a:0")]
    for i, a in enumerate(addrs):
        rec["local_addr"][i] = np.frombuffer(a, np.uint8)
    rec["role"], rec["flags"] = [CONNECT, ACCEPT, CONNECT], [0, RESET_RECEIVED | RESET_SENT, FAILED | NO_OWNER]
    rec["error"] = [0, errno.ECONNRESET, errno.ECONNREFUSED]
    cols = tcp_connections.columns(rec, 0)
    assert strings(cols["role"]) == [b"connect", b"accept", b"connect"]
    assert strings(cols["reset"]) == [b"", b"both", b""]
    assert strings(cols["error"]) == [b"", b"ECONNRESET", b"ECONNREFUSED"]
    assert cols["failed"].tolist() == [0, 0, 1] and cols["owner_known"].tolist() == [1, 1, 0]
    schema = SCHEMAS["tcp_connections"]
    header = batch_pb2.BatchHeader(batch_id="b", stream="tcp_connections", sequence=1, row_count=3)
    decoded = decode_batch(schema, encode_batch(schema, header, cols))
    for name, want in (("role", ["connect", "accept", "connect"]), ("error", ["", "ECONNRESET", "ECONNREFUSED"])):
        col = decoded.columns[name]
        assert isinstance(col, StringColumn) and col.decoded().tolist() == want
    rec["role"][0] = 9  # a role this agent does not know
    assert strings(tcp_connections.columns(rec[:1], 0)["role"]) == [b"?"]
    local = decoded.columns["local_addr"]
    assert isinstance(local, np.ndarray) and local.shape == (3, 4)
    assert native.column_bytes("IPv6", local, 3) == b"".join(addrs)


def test_record_layout_matches_the_header() -> None:
    from node_agent.btf import Btf

    btf = Btf.from_file(BPF_DIR / "tcp_connections.bpf.o")
    assert btf.struct_size("tcp_connection_event") == 128
    offsets = {m.name: (m.offset, m.size) for m in btf.members("tcp_connection_event")}
    assert offsets["local_addr"] == (48, 16) and offsets["remote_addr"] == (64, 16)
    assert offsets["comm"] == (104, 16) and offsets["flags"] == (122, 1)


# --- the whole path: kernel -> agent -> batch -> ClickHouse, through `fleetscope run` -----------


def query(data_dir: Path, sql: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "fleetscope", "query", "--data-dir", str(data_dir), "--format", "tsv", sql],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [line.split("\t") for line in out.stdout.splitlines()[1:]]


@pytest.mark.root
@pytest.mark.integration
def test_connections_become_rows_through_fleetscope_run(bpf_dir: Path, tmp_path: Path) -> None:
    n = 20
    data_dir = tmp_path / "store"
    run = FleetscopeProcess(
        "run", "--data-dir", str(data_dir), "--bpf-dir", str(bpf_dir),
        "--probes", "process,tcp_connections", "--status", "log", "--status-interval", "1s", "--sql-listen", "off",
        log=tmp_path / "run.log",
    )  # fmt: skip
    with run:
        run.wait_for_log("probe tcp_connections running", 120)
        with running_server(n) as (server, v4, v6):
            server_comm = comm_of(server.pid).decode()
            done = run_exchanges(n, v4, v6)
        # the last sockets are destroyed after the final ACKs; their rows must be in the
        # ring before the probes detach
        wait_until_sockets_destroyed([(x.client_port, x.server_port) for x in done])
        run.stop(signal.SIGINT)  # shutdown drains the rings and flushes every batch
    assert run.returncode == 0, run.log_text()
    rows = query(
        data_dir,
        "SELECT role, family, IPv6NumToString(local_addr), local_port, IPv6NumToString(remote_addr), "
        "remote_port, pid, comm, owner_known, bytes_sent, bytes_received, failed, reset, error, "
        "retransmits, srtt_us > 0, duration_ns > 0, node != '' FROM fleet.tcp_connections "
        f"WHERE (role = 'connect' AND remote_port IN ({v4}, {v6})) "
        f"OR (role = 'accept' AND local_port IN ({v4}, {v6}))",
    )
    me, my_comm = str(os.getpid()), comm_of(os.getpid()).decode()
    expected = []
    for x in done:
        loop = "::ffff:127.0.0.1" if x.family == 4 else "::1"
        # failed, reset, error, retransmits, srtt_us > 0, duration_ns > 0, node != ''
        tail = ["0", "", "", "0", "1", "1", "1"]
        expected.append(["connect", str(x.family), loop, str(x.client_port), loop, str(x.server_port),
                         me, my_comm, "1", str(x.sent), str(x.received), *tail])  # fmt: skip
        expected.append(["accept", str(x.family), loop, str(x.server_port), loop, str(x.client_port),
                         str(server.pid), server_comm, "1", str(x.received), str(x.sent), *tail])  # fmt: skip
    assert sorted(rows) == sorted(expected)
    ipv4 = query(
        data_dir,
        "SELECT toString(toIPv4(remote_addr)) FROM fleet.tcp_connections "
        f"WHERE family = 4 AND role = 'connect' AND remote_port = {v4} LIMIT 1",
    )
    assert ipv4 == [["127.0.0.1"]]
