/* SPDX-License-Identifier: GPL-2.0 */
/* Histogram key of the "syscall_latency" probe, shared with user space (read via BTF).
 * The value is struct hist (histogram.h). The includer provides __u32/__u64. */
#ifndef FLEETSCOPE_SYSCALL_LATENCY_H
#define FLEETSCOPE_SYSCALL_LATENCY_H

/* Index into the syscall_latency_stats per-CPU array (value: struct stream_stats). */
enum syscall_latency_stream {
	SYSCALL_LATENCY_STREAM = 0,
	SYSCALL_LATENCY_STREAM_COUNT = 1,
};

/* One histogram per (cgroup, syscall) and interval. */
struct syscall_latency_key {
	__u64 cgroup_id; /* cgroup v2 id of the calling thread */
	__u32 nr;        /* syscall number, as raw_syscalls:sys_enter reports it */
	__u32 pad;       /* zero */
};

_Static_assert(sizeof(struct syscall_latency_key) == 16, "syscall_latency_key layout");

#endif /* FLEETSCOPE_SYSCALL_LATENCY_H */
