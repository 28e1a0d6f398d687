/* SPDX-License-Identifier: GPL-2.0 */
/* Helpers shared by every fleetscope probe: includes, per-CPU stream counters and the
 * ring-buffer wakeup policy. Include first, once per probe object. */
#ifndef FLEETSCOPE_COMMON_BPF_H
#define FLEETSCOPE_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

/* Value of every probe's <probe>_stats per-CPU array, one slot per stream; user space
 * reads it through BTF (struct stream_stats) and sums over CPUs. Once the ring is
 * drained, records read == emitted - dropped. */
struct stream_stats {
	__u64 emitted; /* records the probe produced (reservation attempts) */
	__u64 dropped; /* of those, bpf_ringbuf_reserve failures (ring full) */
};

/* Wake the reader only once this many bytes wait in the ring (0: kernel's adaptive
 * default). The agent also drains on a short timer, so low rates need no wakeups. */
const volatile __u64 wakeup_bytes = 0;

/* Filters shared by every probe, set by the loader: the agent's filter_pid and
 * filter_cgroup settings. The cgroup filter matches the cgroup and its descendants. */
const volatile __u32 targ_tgid = 0;      /* only this process (0: all) */
const volatile bool filter_cgroup = false; /* only tasks under the cgroup in cgroup_filter[0] */

struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} cgroup_filter SEC(".maps");

/* Whether the current task passes the configured filters. */
static __always_inline bool filter_pass(void)
{
	if (targ_tgid && (bpf_get_current_pid_tgid() >> 32) != targ_tgid)
		return false;
	/* 1: under the cgroup, 0: not, <0: no cgroup in the map */
	if (filter_cgroup && bpf_current_task_under_cgroup(&cgroup_filter, 0) != 1)
		return false;
	return true;
}

/* Reserve a fixed-size record and count it, as a drop too when the ring is full.
 * Tracepoint programs run with preemption disabled, so plain per-CPU increments cannot
 * race with another event on this CPU. */
static __always_inline void *stream_reserve(void *rb, __u64 size, void *stats_map,
					    __u32 stream)
{
	struct stream_stats *s = bpf_map_lookup_elem(stats_map, &stream);
	void *rec = bpf_ringbuf_reserve(rb, size, 0);

	if (s) {
		s->emitted++;
		if (!rec)
			s->dropped++;
	}
	return rec;
}

/* Submit a record with the wakeup policy: force a wakeup once wakeup_bytes are pending
 * (the query counts reserved records, this one included), otherwise none. */
static __always_inline void stream_submit(void *rb, void *rec)
{
	__u64 flags = 0;

	if (wakeup_bytes) {
		if (bpf_ringbuf_query(rb, BPF_RB_AVAIL_DATA) >= wakeup_bytes)
			flags = BPF_RB_FORCE_WAKEUP;
		else
			flags = BPF_RB_NO_WAKEUP;
	}
	bpf_ringbuf_submit(rec, flags);
}

#endif /* FLEETSCOPE_COMMON_BPF_H */
