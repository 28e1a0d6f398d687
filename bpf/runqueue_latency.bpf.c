// SPDX-License-Identifier: GPL-2.0
/* "runqueue_latency" probe: log2 histograms of run queue wait per cgroup, aggregated in
 * the kernel (histogram.bpf.h); runqlat's logic.
 *
 * A task starts waiting when it is woken (sched_wakeup, sched_wakeup_new) or preempted
 * while runnable (sched_switch with prev still TASK_RUNNING); it stops when sched_switch
 * switches it in. The start time lives in the task's storage (as the kernel's own
 * runqslower does: no capacity limit, freed with the task). sched_switch runs in prev's
 * context, so the waiting task's cgroup comes from next's struct: tp_btf programs only.
 * Classic tracepoints carry pids, not tasks, so this probe has no tracepoint twin. */
#include "common.bpf.h"
#include "histogram.bpf.h"
#include "runqueue_latency.h"

#define TASK_RUNNING 0

HIST_MAPS(runqueue_latency, struct runqueue_latency_key);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RUNQUEUE_LATENCY_STREAM_COUNT);
	__type(key, __u32);
	__type(value, struct stream_stats);
} runqueue_latency_stats SEC(".maps");

/* when the task started waiting for a CPU (0: not waiting) */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} runqueue_start SEC(".maps");

/* task_struct.state became __state in 5.14 */
struct task_struct___old {
	long state;
} __attribute__((preserve_access_index));

const struct runqueue_latency_key *unused_runqueue_latency_key __attribute__((unused));
const struct hist *unused_hist __attribute__((unused));

/* tp_btf arguments are BTF pointers: plain loads (CO-RE relocated), no helper calls */
static __always_inline long task_state(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return t->__state;
	return ((struct task_struct___old *)t)->state;
}

/* the task joins a run queue at now (ns) */
static __always_inline void enqueue(struct task_struct *p, __u64 now)
{
	__u64 *start;

	/* the idle task never waits; the pid filter matches the waiting task */
	if (!p->pid || (targ_tgid && p->tgid != targ_tgid))
		return;
	start = bpf_task_storage_get(&runqueue_start, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!start) {
		hist_count(&runqueue_latency_stats, RUNQUEUE_LATENCY_STREAM, false);
		return;
	}
	*start = now;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(tp_btf__sched_wakeup, struct task_struct *p)
{
	enqueue(p, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(tp_btf__sched_wakeup_new, struct task_struct *p)
{
	enqueue(p, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(tp_btf__sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	struct runqueue_latency_key key;
	__u64 *start, delta, now = 0;
	bool ok;

	/* prev preempted while runnable goes straight back to waiting */
	if (task_state(prev) == TASK_RUNNING) {
		now = bpf_ktime_get_ns();
		enqueue(prev, now);
	}

	/* next stops waiting: measure, unless it was not seen starting to wait (the clock
	 * is read once per switch: it is the costliest helper here, ~40 ns in a VM) */
	start = bpf_task_storage_get(&runqueue_start, next, 0, 0);
	if (!start || !*start)
		return 0;
	if (!now)
		now = bpf_ktime_get_ns();
	delta = now - *start;
	*start = 0;

	/* add it to the histogram of next's cgroup (v2) and count it */
	key.cgroup_id = next->cgroups->dfl_cgrp->kn->id;
	ok = HIST_ADD(runqueue_latency, &key, delta);
	hist_count(&runqueue_latency_stats, RUNQUEUE_LATENCY_STREAM, ok);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
