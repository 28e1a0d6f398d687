// SPDX-License-Identifier: GPL-2.0
/* "tcp_connections" probe: one record per TCP connection end (IPv4 and IPv6), from
 * sock:inet_sock_set_state, tcp:tcp_receive_reset, tcp:tcp_send_reset and
 * tcp:tcp_destroy_sock.
 *
 * Per-socket state lives in a hash map keyed by the struct sock pointer: created when a
 * connect() enters SYN_SENT or a passive open reaches ESTABLISHED from SYN_RECV, its
 * figures snapshotted when the socket enters TCP_CLOSE, and the record written when the
 * kernel destroys the socket. Waiting for destruction lets the record carry what only
 * happens after TCP_CLOSE: the RST that tcp_close()/tcp_disconnect() send after the state
 * change, and the owner of an accepted socket, which often shows itself only in the
 * close() that destroys it.
 *
 * Owner (pid, comm) of an accepted socket: the passive open completes in softirq, where
 * the current task is whatever was interrupted (on loopback: the client). The owner is
 * taken from the first event on the socket while a task holds its lock, i.e. runs a
 * syscall on it: usually close() or shutdown() (see find_owner).
 *
 * Each hook has a classic tracepoint entry (preferred) and a tp_btf twin, which attaches
 * without tracefs; both run the same logic, the tracepoint reading the socket with
 * bpf_probe_read_kernel, tp_btf with plain loads (KREAD). Both use CO-RE offsets.
 *
 * The table holds tcp_max_connections entries, allocated on use (BPF_F_NO_PREALLOC); a
 * connection that finds it full is counted as an emitted and dropped record. */
#include "common.bpf.h"
#include <bpf/bpf_endian.h>
#include "tcp_connections.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* the loader sets tcp_max_connections before load */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64); /* struct sock pointer */
	__type(value, struct tcp_conn);
} tcp_connections_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* default; the loader sets it before load */
} tcp_connections_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCP_CONNECTIONS_STREAM_COUNT);
	__type(key, __u32);
	__type(value, struct stream_stats);
} tcp_connections_stats SEC(".maps");

/* keep the record type in the object's BTF: user space builds its dtype from it */
const struct tcp_connection_event *unused_tcp_connection_event __attribute__((unused));

/* Count a record the probe could not produce (a connection the full table cannot
 * track) as emitted and dropped, like a full ring, so loss accounting sees it. */
static __always_inline void count_untracked(void)
{
	__u32 stream = TCP_CONNECTIONS_STREAM_CONNECTIONS;
	struct stream_stats *s = bpf_map_lookup_elem(&tcp_connections_stats, &stream);

	if (s) {
		s->emitted++;
		s->dropped++;
	}
}

/* Read ptr->field: a plain load where ptr is BTF-typed (tp_btf arguments, which the
 * verifier lets a program dereference), bpf_probe_read_kernel where it is a bare address
 * (classic tracepoint arguments). `direct` is a constant in each entry point, so each
 * program keeps one of the two. */
#define KREAD(direct, ptr, field) ((direct) ? (ptr)->field : BPF_CORE_READ(ptr, field))

/* The socket as a tcp_sock (NULL if it is not one). A tp_btf argument is typed struct
 * sock, beyond which the verifier allows no load: the helper retypes it (5.9+). */
static __always_inline struct tcp_sock *tcp_of(struct sock *sk, const bool direct)
{
	return direct ? bpf_skc_to_tcp_sock(sk) : (struct tcp_sock *)sk;
}

/* Take pid, comm of the current task as the socket's owner. */
static __always_inline void take_owner(struct tcp_conn *c)
{
	c->ev.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(c->ev.comm, sizeof(c->ev.comm));
	c->state |= CONN_OWNER;
}

/* An accepted socket gets its owner at its first event while a task holds the socket
 * lock (sock_owned_by_user): that task is in a syscall on the socket (close(),
 * shutdown(), or release_sock() running the backlog after recvmsg()/sendmsg()). Softirq
 * processing never runs on an owned socket (it queues to the backlog instead), so the
 * task it happens to interrupt is never taken. With a pid or cgroup filter set, this is
 * also when the filter is applied. Returns false when the filter dropped the socket (the
 * caller must not touch c any more). */
static __always_inline bool find_owner(__u64 key, struct tcp_conn *c, struct sock *sk,
				       const bool direct)
{
	if (c->state & CONN_OWNER || !KREAD(direct, sk, sk_lock.owned))
		return true;
	if (!filter_pass()) {
		bpf_map_delete_elem(&tcp_connections_socks, &key);
		return false;
	}
	take_owner(c);
	return true;
}

/* Address and port of both ends, IPv4 as v4-mapped IPv6. */
static __always_inline void read_endpoints(struct tcp_connection_event *e, struct sock *sk,
					   struct tcp_sock *tp, const bool direct)
{
	__u16 family = KREAD(direct, sk, __sk_common.skc_family);
	__be32 a;

	e->family = family == AF_INET6 ? 6 : 4;
	/* inet_sport, not skc_num: leaving TCP_CLOSE releases the bound port (inet_num = 0) */
	e->local_port = bpf_ntohs(KREAD(direct, tp, inet_conn.icsk_inet.inet_sport));
	e->remote_port = bpf_ntohs(KREAD(direct, sk, __sk_common.skc_dport));
	if (family == AF_INET6) {
		if (direct) {
			__builtin_memcpy(e->local_addr, &sk->__sk_common.skc_v6_rcv_saddr, 16);
			__builtin_memcpy(e->remote_addr, &sk->__sk_common.skc_v6_daddr, 16);
		} else {
			bpf_core_read(e->local_addr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
			bpf_core_read(e->remote_addr, 16, &sk->__sk_common.skc_v6_daddr);
		}
		return;
	}
	__builtin_memset(e->local_addr, 0, sizeof(e->local_addr));
	__builtin_memset(e->remote_addr, 0, sizeof(e->remote_addr));
	e->local_addr[10] = e->local_addr[11] = 0xff;
	e->remote_addr[10] = e->remote_addr[11] = 0xff;
	a = KREAD(direct, sk, __sk_common.skc_rcv_saddr);
	__builtin_memcpy(&e->local_addr[12], &a, 4);
	a = KREAD(direct, sk, __sk_common.skc_daddr);
	__builtin_memcpy(&e->remote_addr[12], &a, 4);
}

/* Start tracking a connection end; a full table counts a drop. */
static __always_inline struct tcp_conn *track(__u64 key, struct sock *sk, __u8 role,
					      const bool direct)
{
	struct tcp_conn c = {};
	struct net *net = KREAD(direct, sk, __sk_common.skc_net.net);
	struct cgroup *cgrp;

	c.ev.time_ns = bpf_ktime_get_boot_ns();
	c.ev.role = role;
	c.ev.netns = KREAD(direct, net, ns.inum);
	if (role == TCP_CONN_ROLE_CONNECT) {
		/* connect() runs in the caller's context */
		take_owner(&c);
		c.ev.cgroup_id = bpf_get_current_cgroup_id();
	} else if (bpf_core_field_exists(sk->sk_cgrp_data)) {
		/* the passive open runs in softirq: the socket's cgroup, inherited from the
		 * listener (CONFIG_SOCK_CGROUP_DATA) */
		cgrp = KREAD(direct, sk, sk_cgrp_data.cgroup);
		c.ev.cgroup_id = direct ? cgrp->kn->id : BPF_CORE_READ(cgrp, kn, id);
	}
	if (bpf_map_update_elem(&tcp_connections_socks, &key, &c, BPF_ANY)) {
		count_untracked();
		return NULL;
	}
	return bpf_map_lookup_elem(&tcp_connections_socks, &key);
}

/* Write a tracked connection's record and forget the socket. */
static __always_inline void emit(__u64 key, struct tcp_conn *c)
{
	struct tcp_connection_event *e;

	/* with a pid or cgroup filter, an accepted socket whose owner never showed is not
	 * known to pass it */
	if ((targ_tgid || filter_cgroup) && !(c->state & CONN_OWNER))
		goto out;
	if (!(c->state & CONN_OWNER))
		c->ev.flags |= TCP_CONN_NO_OWNER;

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(&tcp_connections_events, sizeof(*e), &tcp_connections_stats,
			   TCP_CONNECTIONS_STREAM_CONNECTIONS);
	if (!e)
		goto out;
	__builtin_memcpy(e, &c->ev, sizeof(*e));

	/* publish the record */
	stream_submit(&tcp_connections_events, e);
out:
	bpf_map_delete_elem(&tcp_connections_socks, &key);
}

/* Counters at ESTABLISHED, the base of the byte counts (the SYN and SYN-ACK count there). */
static __always_inline void established(struct tcp_conn *c, struct tcp_sock *tp,
					const bool direct)
{
	c->state |= CONN_ESTABLISHED;
	c->base_acked = KREAD(direct, tp, bytes_acked);
	c->base_received = KREAD(direct, tp, bytes_received);
}

/* The socket entered TCP_CLOSE: snapshot its figures (tcp_disconnect() clears them right
 * after the state change). */
static __always_inline void snapshot(struct tcp_conn *c, struct sock *sk, struct tcp_sock *tp,
				     int oldstate, const bool direct)
{
	__u64 acked, received;
	bool fin_acked;

	read_endpoints(&c->ev, sk, tp, direct);
	c->ev.duration_ns = bpf_ktime_get_boot_ns() - c->ev.time_ns;
	c->ev.error = KREAD(direct, sk, sk_err);
	c->ev.retransmits = KREAD(direct, tp, total_retrans);
	c->ev.srtt_us = KREAD(direct, tp, srtt_us) >> 3;
	c->state |= CONN_CLOSED;
	if (!(c->state & CONN_ESTABLISHED)) {
		c->ev.flags |= TCP_CONN_FAILED;
		return;
	}

	/* bytes_acked counts sequence space: our FIN too once it is acked, i.e. when the
	 * FIN was sent (FIN_WAIT1 and later) and nothing is outstanding */
	fin_acked = (oldstate == TCP_FIN_WAIT1 || oldstate == TCP_FIN_WAIT2 ||
		     oldstate == TCP_CLOSING || oldstate == TCP_LAST_ACK) &&
		    KREAD(direct, tp, snd_una) == KREAD(direct, tp, write_seq);
	acked = KREAD(direct, tp, bytes_acked) - c->base_acked - fin_acked;
	/* bytes_received counts the peer's FIN; tcp_fin() sets SOCK_DONE */
	received = KREAD(direct, tp, bytes_received) - c->base_received -
		   !!(KREAD(direct, sk, __sk_common.skc_flags) & (1UL << SOCK_DONE));
	c->ev.bytes_sent = (__s64)acked > 0 ? acked : 0;
	c->ev.bytes_received = (__s64)received > 0 ? received : 0;
}

static __always_inline int handle_set_state(struct sock *sk, int oldstate, int newstate,
					    const bool direct)
{
	__u64 key = (__u64)sk;
	struct tcp_sock *tp;
	struct tcp_conn *c;

	/* connect(): a new connection attempt (a socket may connect again after a failure:
	 * its earlier attempt is written first) */
	if (newstate == TCP_SYN_SENT) {
		c = bpf_map_lookup_elem(&tcp_connections_socks, &key);
		if (c && c->state & CONN_CLOSED)
			emit(key, c);
		if (filter_pass())
			track(key, sk, TCP_CONN_ROLE_CONNECT, direct);
		return 0;
	}

	c = bpf_map_lookup_elem(&tcp_connections_socks, &key);
	if (c && c->state & CONN_CLOSED)
		return 0;
	if (!c && !(oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED))
		return 0;
	tp = tcp_of(sk, direct);
	if (!tp)
		return 0;

	/* passive open complete (a simultaneous open is already tracked as connect) */
	if (!c) {
		c = track(key, sk, TCP_CONN_ROLE_ACCEPT, direct);
		if (c)
			established(c, tp, direct);
		return 0;
	}
	if (!find_owner(key, c, sk, direct))
		return 0;

	if (newstate == TCP_ESTABLISHED && !(c->state & CONN_ESTABLISHED)) {
		established(c, tp, direct);
		c->ev.handshake_ns = bpf_ktime_get_boot_ns() - c->ev.time_ns;
	} else if (newstate == TCP_CLOSE) {
		snapshot(c, sk, tp, oldstate, direct);
	}
	return 0;
}

/* tcp:tcp_receive_reset and tcp:tcp_send_reset: flag a tracked socket. */
static __always_inline int handle_reset(struct sock *sk, __u8 flag, const bool direct)
{
	__u64 key = (__u64)sk;
	struct tcp_conn *c = bpf_map_lookup_elem(&tcp_connections_socks, &key);

	if (!c || !find_owner(key, c, sk, direct))
		return 0;
	c->ev.flags |= flag;
	return 0;
}

/* tcp:tcp_destroy_sock: the socket is gone, write its record. */
static __always_inline int handle_destroy(struct sock *sk, const bool direct)
{
	__u64 key = (__u64)sk;
	struct tcp_conn *c = bpf_map_lookup_elem(&tcp_connections_socks, &key);
	struct tcp_sock *tp;

	if (!c || !find_owner(key, c, sk, direct))
		return 0;
	/* every TCP socket is destroyed in TCP_CLOSE; should its change have gone unseen,
	 * the figures are taken now */
	tp = tcp_of(sk, direct);
	if (!(c->state & CONN_CLOSED) && tp)
		snapshot(c, sk, tp, KREAD(direct, sk, __sk_common.skc_state), direct);
	emit(key, c);
	return 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int tracepoint__sock__inet_sock_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	return handle_set_state((struct sock *)ctx->skaddr, ctx->oldstate, ctx->newstate, false);
}

SEC("tracepoint/tcp/tcp_receive_reset")
int tracepoint__tcp__tcp_receive_reset(struct trace_event_raw_tcp_event_sk *ctx)
{
	return handle_reset((struct sock *)ctx->skaddr, TCP_CONN_RESET_RECEIVED, false);
}

SEC("tracepoint/tcp/tcp_send_reset")
int tracepoint__tcp__tcp_send_reset(struct trace_event_raw_tcp_send_reset *ctx)
{
	return handle_reset((struct sock *)ctx->skaddr, TCP_CONN_RESET_SENT, false);
}

SEC("tracepoint/tcp/tcp_destroy_sock")
int tracepoint__tcp__tcp_destroy_sock(struct trace_event_raw_tcp_event_sk *ctx)
{
	return handle_destroy((struct sock *)ctx->skaddr, false);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tp_btf__inet_sock_set_state, struct sock *sk, const int oldstate, const int newstate)
{
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	return handle_set_state(sk, oldstate, newstate, true);
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(tp_btf__tcp_receive_reset, struct sock *sk)
{
	return handle_reset(sk, TCP_CONN_RESET_RECEIVED, true);
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(tp_btf__tcp_send_reset, struct sock *sk, const struct sk_buff *skb)
{
	/* a reset answering a segment for no socket has none */
	if (!sk)
		return 0;
	return handle_reset(sk, TCP_CONN_RESET_SENT, true);
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(tp_btf__tcp_destroy_sock, struct sock *sk)
{
	return handle_destroy(sk, true);
}

char LICENSE[] SEC("license") = "GPL";
