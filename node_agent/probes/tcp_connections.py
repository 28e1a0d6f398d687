"""The "tcp_connections" probe: one row per TCP connection end, IPv4 and IPv6, connect and
accept side, from the socket state tracepoints (bpf/tcp_connections.bpf.c)."""

from __future__ import annotations

import errno
from collections.abc import Mapping

import numpy as np

from node_agent.columns import Records, coded_strings, padded_strings
from node_agent.probes import BccVariant, Hook, KernelField, Probe, ProbeSettings, Stream

__all__ = ["ERRNO_NAMES", "PROBE", "SOCKS_MAP"]

SOCKS_MAP = "tcp_connections_socks"  # per-socket state, sized by tcp_max_connections
# TCP_CONN_* in bpf/tcp_connections.h
FAILED, RESET_RECEIVED, RESET_SENT, NO_OWNER = 1, 2, 4, 8
ROLES = np.array([b"", b"connect", b"accept", b"?"], dtype="S7")  # index: role (1, 2; 3: unknown)
RESETS = np.array([b"", b"received", b"sent", b"both"], dtype="S8")  # index: flags >> 1 & 3
# errno -> name, for every value up to MAX_ERRNO (4095); 0 is ""
ERRNO_NAMES = np.array([errno.errorcode.get(i, f"E{i}").encode() if i else b"" for i in range(4096)], dtype="S16")


def rodata(settings: ProbeSettings) -> Mapping[str, int | bytes]:
    """No knobs of its own: the shared pid and cgroup filters apply (common.bpf.h)."""
    return {}


def map_sizes(settings: ProbeSettings) -> Mapping[str, int]:
    """The per-socket table holds tcp_max_connections connection ends at once."""
    return {SOCKS_MAP: settings.tcp_max_connections}


def addresses(field: np.ndarray) -> np.ndarray:
    """__u8[16] address fields -> (rows, 4) little-endian u32 holding the same bytes."""
    return np.ascontiguousarray(field).view("<u4")


def columns(rec: Records, offset_ns: int) -> dict[str, np.ndarray]:
    """tcp_connection_event records -> TcpConnectionsBatch columns (role, reset and error
    pre-encoded from their codes, see coded_strings)."""
    flags = rec["flags"].astype("<u4")
    return {
        "time": rec["time_ns"] + np.uint64(offset_ns),
        "duration_ns": rec["duration_ns"],
        "handshake_ns": rec["handshake_ns"],
        "pid": rec["pid"],
        "comm": padded_strings(rec["comm"]),  # NUL-padded: bpf_get_current_comm into a zeroed entry
        "cgroup_id": rec["cgroup_id"],
        "owner_known": ((flags & NO_OWNER) == 0).astype("<u4"),
        "role": coded_strings(rec["role"], ROLES),
        "family": rec["family"].astype("<u4"),
        "local_addr": addresses(rec["local_addr"]),
        "local_port": rec["local_port"].astype("<u4"),
        "remote_addr": addresses(rec["remote_addr"]),
        "remote_port": rec["remote_port"].astype("<u4"),
        "netns": rec["netns"],
        "bytes_sent": rec["bytes_sent"],
        "bytes_received": rec["bytes_received"],
        "srtt_us": rec["srtt_us"],
        "retransmits": rec["retransmits"],
        "reset": coded_strings((flags >> 1) & 3, RESETS),
        "failed": flags & FAILED,
        "error": coded_strings(rec["error"], ERRNO_NAMES),
    }


PROBE = Probe(
    name="tcp_connections",
    object_file="tcp_connections.bpf.o",
    streams=(Stream("tcp_connections", "tcp_connections_events", "tcp_connection_event", 0, columns),),
    hooks=(
        # classic tracepoints need tracefs mounted; tp_btf (5.5+) attaches without it.
        # sock:inet_sock_set_state is 4.16+, the tcp: tracepoints 4.15+
        Hook(
            "sock/inet_sock_set_state",
            ("tracepoint__sock__inet_sock_set_state", "tp_btf__inet_sock_set_state"),
        ),
        Hook("tcp/tcp_receive_reset", ("tracepoint__tcp__tcp_receive_reset", "tp_btf__tcp_receive_reset")),
        Hook("tcp/tcp_send_reset", ("tracepoint__tcp__tcp_send_reset", "tp_btf__tcp_send_reset")),
        # where the record is written
        Hook("tcp/tcp_destroy_sock", ("tracepoint__tcp__tcp_destroy_sock", "tp_btf__tcp_destroy_sock")),
    ),
    stats_map="tcp_connections_stats",
    rodata=rodata,
    # bcc: the socket fields at offsets from the kernel's BTF; the tp_btf twins run as raw
    # tracepoints of the same events (bcc cannot attach tp_btf)
    bcc=BccVariant(
        "tcp_connections.bcc.c",
        (
            KernelField("sock", "sk_protocol", 2),  # a bitfield before 5.6: refused there
            KernelField("sock", "sk_err", 4),
            KernelField("sock", "sk_lock", 0),
            KernelField("socket_lock_t", "owned", 4),
            KernelField("sock_common", "skc_family", 2),
            KernelField("sock_common", "skc_dport", 2),
            KernelField("sock_common", "skc_daddr", 4),
            KernelField("sock_common", "skc_rcv_saddr", 4),
            KernelField("sock_common", "skc_v6_daddr", 16),
            KernelField("sock_common", "skc_v6_rcv_saddr", 16),
            KernelField("sock_common", "skc_net", 8),
            KernelField("sock_common", "skc_state", 1),
            KernelField("sock_common", "skc_flags", 8),
            KernelField("inet_sock", "inet_sport", 2),
            KernelField("tcp_sock", "bytes_acked", 8),
            KernelField("tcp_sock", "bytes_received", 8),
            KernelField("tcp_sock", "total_retrans", 4),
            KernelField("tcp_sock", "srtt_us", 4),
            KernelField("tcp_sock", "snd_una", 4),
            KernelField("tcp_sock", "write_seq", 4),
            KernelField("net", "ns", 0),
            KernelField("ns_common", "inum", 4),
            KernelField("sock", "sk_cgrp_data", 0, optional=True),  # CONFIG_SOCK_CGROUP_DATA
            KernelField("sock_cgroup_data", "cgroup", 8, optional=True),  # 5.15+
            KernelField("cgroup", "kn", 8),
            KernelField("kernfs_node", "id", 8),
        ),
        targets=tuple(
            (f"tp_btf__{event}", event)
            for event in ("inet_sock_set_state", "tcp_receive_reset", "tcp_send_reset", "tcp_destroy_sock")
        ),
    ),
    map_sizes=map_sizes,
)
