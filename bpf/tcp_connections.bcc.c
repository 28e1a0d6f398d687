// SPDX-License-Identifier: GPL-2.0
/* "tcp_connections" probe for the bcc fallback loader: tcp_connections.bpf.c's logic and
 * records (tcp_connections.h), compiled by bcc at load time. Keep the two in step: the
 * integration test runs both and compares rows. Conventions (offsets, entry point names,
 * tracefs) as in process.bcc.c.
 *
 * The CO-RE object reads the socket through the classic tracepoints' skaddr (with
 * bpf_probe_read_kernel) or through tp_btf's typed struct sock. bcc cannot attach tp_btf,
 * but every tp_btf twin here has the raw tracepoint of the same event, with the same
 * arguments untyped: the functions named tp_btf__<event> are raw tracepoint programs
 * (BccVariant.targets), which read the socket like the classic ones, at offsets from the
 * kernel's BTF. Where tp_btf uses bpf_skc_to_tcp_sock(), this casts: every socket these
 * events pass is a full TCP socket (inet_sock_set_state after the protocol test,
 * tcp_destroy_sock always, resets only for sockets in the table), as the classic tracepoint
 * programs assume too. struct tcp_sock starts with inet_connection_sock, which starts with
 * inet_sock, which starts with struct sock and its sock_common: the kernel's own casts
 * (inet_sk(), tcp_sk()) rely on that, and so do these offsets. */
#include "common.bcc.h"
#include "tcp_connections.h"

#ifdef FS_KERNEL_HEADERS
#include <net/sock.h>
#include <net/inet_sock.h>
#include <linux/tcp.h>
#include <linux/cgroup-defs.h>
#include <linux/kernfs.h>
#define FS_OFF_sock__sk_protocol __builtin_offsetof(struct sock, sk_protocol)
#define FS_OFF_sock__sk_err __builtin_offsetof(struct sock, sk_err)
#define FS_OFF_sock__sk_lock __builtin_offsetof(struct sock, sk_lock)
#define FS_OFF_socket_lock_t__owned __builtin_offsetof(socket_lock_t, owned)
#define FS_OFF_sock_common__skc_family __builtin_offsetof(struct sock_common, skc_family)
#define FS_OFF_sock_common__skc_dport __builtin_offsetof(struct sock_common, skc_dport)
#define FS_OFF_sock_common__skc_daddr __builtin_offsetof(struct sock_common, skc_daddr)
#define FS_OFF_sock_common__skc_rcv_saddr __builtin_offsetof(struct sock_common, skc_rcv_saddr)
#define FS_OFF_sock_common__skc_v6_daddr __builtin_offsetof(struct sock_common, skc_v6_daddr)
#define FS_OFF_sock_common__skc_v6_rcv_saddr \
	__builtin_offsetof(struct sock_common, skc_v6_rcv_saddr)
#define FS_OFF_sock_common__skc_net __builtin_offsetof(struct sock_common, skc_net)
#define FS_OFF_sock_common__skc_state __builtin_offsetof(struct sock_common, skc_state)
#define FS_OFF_sock_common__skc_flags __builtin_offsetof(struct sock_common, skc_flags)
#define FS_OFF_inet_sock__inet_sport __builtin_offsetof(struct inet_sock, inet_sport)
#define FS_OFF_tcp_sock__bytes_acked __builtin_offsetof(struct tcp_sock, bytes_acked)
#define FS_OFF_tcp_sock__bytes_received __builtin_offsetof(struct tcp_sock, bytes_received)
#define FS_OFF_tcp_sock__total_retrans __builtin_offsetof(struct tcp_sock, total_retrans)
#define FS_OFF_tcp_sock__srtt_us __builtin_offsetof(struct tcp_sock, srtt_us)
#define FS_OFF_tcp_sock__snd_una __builtin_offsetof(struct tcp_sock, snd_una)
#define FS_OFF_tcp_sock__write_seq __builtin_offsetof(struct tcp_sock, write_seq)
#define FS_OFF_net__ns __builtin_offsetof(struct net, ns)
#define FS_OFF_ns_common__inum __builtin_offsetof(struct ns_common, inum)
#if defined(CONFIG_SOCK_CGROUP_DATA) && LINUX_VERSION_CODE >= KERNEL_VERSION(5, 15, 0)
#define FS_OFF_sock__sk_cgrp_data __builtin_offsetof(struct sock, sk_cgrp_data)
#define FS_OFF_sock_cgroup_data__cgroup __builtin_offsetof(struct sock_cgroup_data, cgroup)
#endif
#define FS_OFF_cgroup__kn __builtin_offsetof(struct cgroup, kn)
#define FS_OFF_kernfs_node__id __builtin_offsetof(struct kernfs_node, id)
#else
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
/* include/net/tcp_states.h */
enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_SENT,
	TCP_SYN_RECV,
	TCP_FIN_WAIT1,
	TCP_FIN_WAIT2,
	TCP_TIME_WAIT,
	TCP_CLOSE,
	TCP_CLOSE_WAIT,
	TCP_LAST_ACK,
	TCP_LISTEN,
	TCP_CLOSING,
};
#define SOCK_DONE 1 /* enum sock_flags, include/net/sock.h */
/* a field type in tcp:tcp_send_reset's record (6.10+), which bcc declares from tracefs */
enum sk_rst_reason { FS_SK_RST_REASON };
#endif

#ifndef FS_MAX_tcp_connections_socks
#define FS_MAX_tcp_connections_socks 65536 /* the loader passes tcp_max_connections */
#endif

#define bpf_ntohs(x) __builtin_bswap16(x)

/* tcp_conn.state bits, internal */
#define CONN_OWNER (1U << 0)       /* pid/comm captured */
#define CONN_ESTABLISHED (1U << 1) /* reached ESTABLISHED */
#define CONN_CLOSED (1U << 2)      /* entered TCP_CLOSE: ev is final except flags/owner */

/* Per-socket state; ev is the record to be written. */
struct tcp_conn {
	struct tcp_connection_event ev;
	__u64 base_acked;    /* tcp_sock.bytes_acked at ESTABLISHED (the SYN counts there) */
	__u64 base_received; /* tcp_sock.bytes_received at ESTABLISHED */
	__u32 state;         /* CONN_* */
	__u32 _pad;
};

/* maps created by the loader (as tcp_connections.bpf.c declares them):
 * tcp_connections_events (ring buffer), tcp_connections_stats (per-CPU struct stream_stats) */

/* struct sock address -> its connection; allocated on use, as in tcp_connections.bpf.c */
BPF_F_TABLE("hash", __u64, struct tcp_conn, tcp_connections_socks, FS_MAX_tcp_connections_socks,
	    BPF_F_NO_PREALLOC);

/* A kernel value at sk + off, of type T (0 if the read faults). */
#define SK_READ(T, sk, off)                                                                   \
	({                                                                                    \
		T _v = 0;                                                                     \
		FS_READ(_v, sk, off);                                                         \
		_v;                                                                           \
	})

/* Count a record the probe could not produce (a connection the full table cannot
 * track) as emitted and dropped, like a full ring, so loss accounting sees it. */
FS_INLINE void count_untracked(void)
{
	__u32 stream = TCP_CONNECTIONS_STREAM_CONNECTIONS;
	struct stream_stats *s = bpf_map_lookup_elem(FS_MAP(tcp_connections_stats), &stream);

	if (s) {
		s->emitted++;
		s->dropped++;
	}
}

/* Take pid, comm of the current task as the socket's owner. */
FS_INLINE void take_owner(struct tcp_conn *c)
{
	c->ev.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(c->ev.comm, sizeof(c->ev.comm));
	c->state |= CONN_OWNER;
}

/* An accepted socket gets its owner at its first event while a task holds the socket lock
 * (sock_owned_by_user), see tcp_connections.bpf.c. Returns false when the filter dropped
 * the socket (the caller must not touch c any more). */
FS_INLINE bool find_owner(__u64 key, struct tcp_conn *c, unsigned long sk)
{
	if (c->state & CONN_OWNER ||
	    !SK_READ(int, sk, FS_OFF_sock__sk_lock + FS_OFF_socket_lock_t__owned))
		return true;
	if (!filter_pass()) {
		tcp_connections_socks.delete(&key);
		return false;
	}
	take_owner(c);
	return true;
}

/* Address and port of both ends, IPv4 as v4-mapped IPv6. */
FS_INLINE void read_endpoints(struct tcp_connection_event *e, unsigned long sk)
{
	__u16 family = SK_READ(__u16, sk, FS_OFF_sock_common__skc_family);
	__u32 a;

	e->family = family == AF_INET6 ? 6 : 4;
	/* inet_sport, not skc_num: leaving TCP_CLOSE releases the bound port (inet_num = 0) */
	e->local_port = bpf_ntohs(SK_READ(__u16, sk, FS_OFF_inet_sock__inet_sport));
	e->remote_port = bpf_ntohs(SK_READ(__u16, sk, FS_OFF_sock_common__skc_dport));
	if (family == AF_INET6) {
		bpf_probe_read_kernel(e->local_addr, 16,
				      (void *)(sk + FS_OFF_sock_common__skc_v6_rcv_saddr));
		bpf_probe_read_kernel(e->remote_addr, 16,
				      (void *)(sk + FS_OFF_sock_common__skc_v6_daddr));
		return;
	}
	__builtin_memset(e->local_addr, 0, sizeof(e->local_addr));
	__builtin_memset(e->remote_addr, 0, sizeof(e->remote_addr));
	e->local_addr[10] = e->local_addr[11] = 0xff;
	e->remote_addr[10] = e->remote_addr[11] = 0xff;
	a = SK_READ(__u32, sk, FS_OFF_sock_common__skc_rcv_saddr);
	__builtin_memcpy(&e->local_addr[12], &a, 4);
	a = SK_READ(__u32, sk, FS_OFF_sock_common__skc_daddr);
	__builtin_memcpy(&e->remote_addr[12], &a, 4);
}

/* Start tracking a connection end; a full table counts a drop. */
FS_INLINE struct tcp_conn *track(__u64 key, unsigned long sk, __u8 role)
{
	struct tcp_conn c = {};
	unsigned long net = SK_READ(unsigned long, sk, FS_OFF_sock_common__skc_net);

	c.ev.time_ns = bpf_ktime_get_boot_ns();
	c.ev.role = role;
	c.ev.netns = SK_READ(__u32, net, FS_OFF_net__ns + FS_OFF_ns_common__inum);
	if (role == TCP_CONN_ROLE_CONNECT) {
		/* connect() runs in the caller's context */
		take_owner(&c);
		c.ev.cgroup_id = bpf_get_current_cgroup_id();
	}
#if defined(FS_OFF_sock__sk_cgrp_data) && defined(FS_OFF_sock_cgroup_data__cgroup)
	else {
		/* the passive open runs in softirq: the socket's cgroup, inherited from the
		 * listener (CONFIG_SOCK_CGROUP_DATA) */
		unsigned long cgrp = SK_READ(unsigned long, sk, FS_OFF_sock__sk_cgrp_data +
								 FS_OFF_sock_cgroup_data__cgroup);
		unsigned long kn = SK_READ(unsigned long, cgrp, FS_OFF_cgroup__kn);

		c.ev.cgroup_id = SK_READ(__u64, kn, FS_OFF_kernfs_node__id);
	}
#endif
	if (tcp_connections_socks.update(&key, &c)) {
		count_untracked();
		return NULL;
	}
	return tcp_connections_socks.lookup(&key);
}

/* Write a tracked connection's record and forget the socket. */
FS_INLINE void emit(__u64 key, struct tcp_conn *c)
{
	struct tcp_connection_event *e;

	/* with a pid or cgroup filter, an accepted socket whose owner never showed is not
	 * known to pass it */
	if ((targ_tgid || filter_cgroup) && !(c->state & CONN_OWNER))
		goto out;
	if (!(c->state & CONN_OWNER))
		c->ev.flags |= TCP_CONN_NO_OWNER;

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(FS_MAP(tcp_connections_events), sizeof(*e),
			   FS_MAP(tcp_connections_stats), TCP_CONNECTIONS_STREAM_CONNECTIONS);
	if (!e)
		goto out;
	__builtin_memcpy(e, &c->ev, sizeof(*e));

	/* publish the record */
	stream_submit(FS_MAP(tcp_connections_events), e);
out:
	tcp_connections_socks.delete(&key);
}

/* Counters at ESTABLISHED, the base of the byte counts (the SYN and SYN-ACK count there). */
FS_INLINE void established(struct tcp_conn *c, unsigned long tp)
{
	c->state |= CONN_ESTABLISHED;
	c->base_acked = SK_READ(__u64, tp, FS_OFF_tcp_sock__bytes_acked);
	c->base_received = SK_READ(__u64, tp, FS_OFF_tcp_sock__bytes_received);
}

/* The socket entered TCP_CLOSE: snapshot its figures (tcp_disconnect() clears them right
 * after the state change). */
FS_INLINE void snapshot(struct tcp_conn *c, unsigned long sk, int oldstate)
{
	unsigned long tp = sk; /* struct tcp_sock starts with struct sock */
	__u64 acked, received;
	bool fin_acked;

	read_endpoints(&c->ev, sk);
	c->ev.duration_ns = bpf_ktime_get_boot_ns() - c->ev.time_ns;
	c->ev.error = SK_READ(int, sk, FS_OFF_sock__sk_err);
	c->ev.retransmits = SK_READ(__u32, tp, FS_OFF_tcp_sock__total_retrans);
	c->ev.srtt_us = SK_READ(__u32, tp, FS_OFF_tcp_sock__srtt_us) >> 3;
	c->state |= CONN_CLOSED;
	if (!(c->state & CONN_ESTABLISHED)) {
		c->ev.flags |= TCP_CONN_FAILED;
		return;
	}

	/* bytes_acked counts sequence space: our FIN too once it is acked, i.e. when the
	 * FIN was sent (FIN_WAIT1 and later) and nothing is outstanding */
	fin_acked = (oldstate == TCP_FIN_WAIT1 || oldstate == TCP_FIN_WAIT2 ||
		     oldstate == TCP_CLOSING || oldstate == TCP_LAST_ACK) &&
		    SK_READ(__u32, tp, FS_OFF_tcp_sock__snd_una) ==
			    SK_READ(__u32, tp, FS_OFF_tcp_sock__write_seq);
	acked = SK_READ(__u64, tp, FS_OFF_tcp_sock__bytes_acked) - c->base_acked - fin_acked;
	/* bytes_received counts the peer's FIN; tcp_fin() sets SOCK_DONE */
	received = SK_READ(__u64, tp, FS_OFF_tcp_sock__bytes_received) - c->base_received -
		   !!(SK_READ(unsigned long, sk, FS_OFF_sock_common__skc_flags) &
		      (1UL << SOCK_DONE));
	c->ev.bytes_sent = (__s64)acked > 0 ? acked : 0;
	c->ev.bytes_received = (__s64)received > 0 ? received : 0;
}

FS_INLINE int handle_set_state(unsigned long sk, int oldstate, int newstate)
{
	__u64 key = sk;
	struct tcp_conn *c;

	/* connect(): a new connection attempt (a socket may connect again after a failure:
	 * its earlier attempt is written first) */
	if (newstate == TCP_SYN_SENT) {
		c = tcp_connections_socks.lookup(&key);
		if (c && c->state & CONN_CLOSED)
			emit(key, c);
		if (filter_pass())
			track(key, sk, TCP_CONN_ROLE_CONNECT);
		return 0;
	}

	c = tcp_connections_socks.lookup(&key);
	if (c && c->state & CONN_CLOSED)
		return 0;
	if (!c && !(oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED))
		return 0;
	if (!sk)
		return 0;

	/* passive open complete (a simultaneous open is already tracked as connect) */
	if (!c) {
		c = track(key, sk, TCP_CONN_ROLE_ACCEPT);
		if (c)
			established(c, sk);
		return 0;
	}
	if (!find_owner(key, c, sk))
		return 0;

	if (newstate == TCP_ESTABLISHED && !(c->state & CONN_ESTABLISHED)) {
		established(c, sk);
		c->ev.handshake_ns = bpf_ktime_get_boot_ns() - c->ev.time_ns;
	} else if (newstate == TCP_CLOSE) {
		snapshot(c, sk, oldstate);
	}
	return 0;
}

/* tcp:tcp_receive_reset and tcp:tcp_send_reset: flag a tracked socket. */
FS_INLINE int handle_reset(unsigned long sk, __u8 flag)
{
	__u64 key = sk;
	struct tcp_conn *c = tcp_connections_socks.lookup(&key);

	if (!c || !find_owner(key, c, sk))
		return 0;
	c->ev.flags |= flag;
	return 0;
}

/* tcp:tcp_destroy_sock: the socket is gone, write its record. */
FS_INLINE int handle_destroy(unsigned long sk)
{
	__u64 key = sk;
	struct tcp_conn *c = tcp_connections_socks.lookup(&key);

	if (!c || !find_owner(key, c, sk))
		return 0;
	/* every TCP socket is destroyed in TCP_CLOSE; should its change have gone unseen,
	 * the figures are taken now */
	if (!(c->state & CONN_CLOSED))
		snapshot(c, sk, SK_READ(__u8, sk, FS_OFF_sock_common__skc_state));
	emit(key, c);
	return 0;
}

#ifdef FS_TRACEPOINTS
int tp__sock__inet_sock_set_state(struct tracepoint__sock__inet_sock_set_state *args)
{
	if (args->protocol != IPPROTO_TCP)
		return 0;
	return handle_set_state((unsigned long)args->skaddr, args->oldstate, args->newstate);
}

int tp__tcp__tcp_receive_reset(struct tracepoint__tcp__tcp_receive_reset *args)
{
	return handle_reset((unsigned long)args->skaddr, TCP_CONN_RESET_RECEIVED);
}

int tp__tcp__tcp_send_reset(struct tracepoint__tcp__tcp_send_reset *args)
{
	return handle_reset((unsigned long)args->skaddr, TCP_CONN_RESET_SENT);
}

int tp__tcp__tcp_destroy_sock(struct tracepoint__tcp__tcp_destroy_sock *args)
{
	return handle_destroy((unsigned long)args->skaddr);
}
#endif

/* raw tracepoints in place of tp_btf (see the top): TP_PROTO(const struct sock *sk,
 * const int oldstate, const int newstate) */
int tp_btf__inet_sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	unsigned long sk = ctx->args[0];

	if (SK_READ(__u16, sk, FS_OFF_sock__sk_protocol) != IPPROTO_TCP)
		return 0;
	return handle_set_state(sk, (int)ctx->args[1], (int)ctx->args[2]);
}

/* TP_PROTO(struct sock *sk) */
int tp_btf__tcp_receive_reset(struct bpf_raw_tracepoint_args *ctx)
{
	return handle_reset(ctx->args[0], TCP_CONN_RESET_RECEIVED);
}

/* TP_PROTO(const struct sock *sk, const struct sk_buff *skb, ...) */
int tp_btf__tcp_send_reset(struct bpf_raw_tracepoint_args *ctx)
{
	/* a reset answering a segment for no socket has none */
	if (!ctx->args[0])
		return 0;
	return handle_reset(ctx->args[0], TCP_CONN_RESET_SENT);
}

/* TP_PROTO(struct sock *sk) */
int tp_btf__tcp_destroy_sock(struct bpf_raw_tracepoint_args *ctx)
{
	return handle_destroy(ctx->args[0]);
}
