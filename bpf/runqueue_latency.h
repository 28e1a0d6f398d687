/* SPDX-License-Identifier: GPL-2.0 */
/* Histogram key of the "runqueue_latency" probe, shared with user space (read via BTF).
 * The value is struct hist (histogram.h). The includer provides __u64. */
#ifndef FLEETSCOPE_RUNQUEUE_LATENCY_H
#define FLEETSCOPE_RUNQUEUE_LATENCY_H

/* Index into the runqueue_latency_stats per-CPU array (value: struct stream_stats). */
enum runqueue_latency_stream {
	RUNQUEUE_LATENCY_STREAM = 0,
	RUNQUEUE_LATENCY_STREAM_COUNT = 1,
};

/* One histogram per cgroup and interval. */
struct runqueue_latency_key {
	__u64 cgroup_id; /* cgroup v2 id of the task that waited */
};

_Static_assert(sizeof(struct runqueue_latency_key) == 8, "runqueue_latency_key layout");

#endif /* FLEETSCOPE_RUNQUEUE_LATENCY_H */
