/* SPDX-License-Identifier: GPL-2.0 */
/* Event record of the "tcp_connections" probe, shared with user space. Python reads these
 * bytes through the object's BTF: fixed-width types, largest first, no hidden holes.
 * The includer provides __u8/__u16/__u32/__u64 (vmlinux.h in BPF, <linux/types.h> in
 * user space). */
#ifndef FLEETSCOPE_TCP_CONNECTIONS_H
#define FLEETSCOPE_TCP_CONNECTIONS_H

#define TCP_CONN_COMM_LEN 16

/* tcp_connection_event.role */
#define TCP_CONN_ROLE_CONNECT 1 /* this end called connect() (active open) */
#define TCP_CONN_ROLE_ACCEPT 2  /* this end came from a listener (passive open) */

/* tcp_connection_event.flags */
#define TCP_CONN_FAILED (1U << 0)         /* a connect that never reached ESTABLISHED */
#define TCP_CONN_RESET_RECEIVED (1U << 1) /* tcp:tcp_receive_reset on this socket */
#define TCP_CONN_RESET_SENT (1U << 2)     /* tcp:tcp_send_reset on this socket */
#define TCP_CONN_NO_OWNER (1U << 3)       /* pid/comm unknown: never seen in task context */

/* Index into the tcp_connections_stats per-CPU array (value: struct stream_stats). */
enum tcp_connections_stream {
	TCP_CONNECTIONS_STREAM_CONNECTIONS = 0,
	TCP_CONNECTIONS_STREAM_COUNT = 1,
};

/* One TCP connection (one end of it), written when the kernel destroys the socket; the
 * figures are taken when it entered TCP_CLOSE. Addresses are IPv6 in network byte order,
 * IPv4 as v4-mapped (::ffff:a.b.c.d). */
struct tcp_connection_event {
	__u64 time_ns;        /* open, bpf_ktime_get_boot_ns(): SYN_SENT (connect), ESTABLISHED (accept) */
	__u64 duration_ns;    /* open -> TCP_CLOSE */
	__u64 handshake_ns;   /* SYN_SENT -> ESTABLISHED (connect side), else 0 */
	__u64 cgroup_id;      /* cgroup v2 id: the connecting task's, or the accepted socket's */
	__u64 bytes_sent;     /* payload bytes acknowledged by the peer */
	__u64 bytes_received; /* payload bytes received in sequence */
	__u8 local_addr[16];
	__u8 remote_addr[16];
	__u32 pid;         /* tgid of the owner (0 if unknown, see TCP_CONN_NO_OWNER) */
	__u32 srtt_us;     /* smoothed RTT at close, microseconds */
	__u32 retransmits; /* tcp_sock.total_retrans: retransmitted segments, SYNs included */
	__u32 netns;       /* network namespace inode number */
	__u32 error;       /* sk_err when the socket entered TCP_CLOSE (errno), 0 if none */
	__u16 local_port;
	__u16 remote_port;
	char comm[TCP_CONN_COMM_LEN]; /* owner's comm, NUL padded */
	__u8 family;                  /* socket family: 4 (AF_INET) or 6 (AF_INET6) */
	__u8 role;                    /* TCP_CONN_ROLE_* */
	__u8 flags;                   /* TCP_CONN_* */
	__u8 _pad[5];
};

_Static_assert(sizeof(struct tcp_connection_event) == 128, "tcp_connection_event layout");

#endif /* FLEETSCOPE_TCP_CONNECTIONS_H */
