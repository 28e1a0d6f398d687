// SPDX-License-Identifier: GPL-2.0
/* "syscall_latency" probe: log2 histograms of syscall latency per (cgroup, syscall),
 * aggregated in the kernel (histogram.bpf.h); only the histograms reach user space.
 *
 * sys_enter stores the time and number in the thread's task storage (no capacity limit,
 * freed with the task, no delete per call); sys_exit of the same thread measures. Each
 * hook has a raw_tp program, preferred (no perf trace record is built per event on this
 * hot path), and a classic tracepoint twin for loaders that only have those (bcc). */
#include "common.bpf.h"
#include "histogram.bpf.h"
#include "syscall_latency.h"

HIST_MAPS(syscall_latency, struct syscall_latency_key);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SYSCALL_LATENCY_STREAM_COUNT);
	__type(key, __u32);
	__type(value, struct stream_stats);
} syscall_latency_stats SEC(".maps");

/* the syscall a thread is in: entry time (0: none being measured) and number */
struct syscall_start {
	__u64 ns;
	__u32 nr;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct syscall_start);
} syscall_start SEC(".maps");

/* keep the key type in the object's BTF: user space builds its dtype from it */
const struct syscall_latency_key *unused_syscall_latency_key __attribute__((unused));
const struct hist *unused_hist __attribute__((unused));

static __always_inline int on_enter(long nr)
{
	struct syscall_start *s;

	/* -1: a tracer or seccomp skipped the call; not a syscall that runs */
	if (nr < 0)
		return 0;

	/* the configured pid / cgroup filters (sys_exit measures only what was started) */
	if (!filter_pass())
		return 0;

	/* the thread's start slot, created on its first syscall */
	s = bpf_task_storage_get(&syscall_start, bpf_get_current_task_btf(), 0,
				 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!s) {
		hist_count(&syscall_latency_stats, SYSCALL_LATENCY_STREAM, false);
		return 0;
	}
	s->nr = nr;
	s->ns = bpf_ktime_get_ns();
	return 0;
}

static __always_inline int on_exit(void)
{
	struct syscall_latency_key key = {};
	struct syscall_start *s;
	__u64 delta;
	bool ok;

	/* a syscall measured since its entry; none for threads that entered before attach */
	s = bpf_task_storage_get(&syscall_start, bpf_get_current_task_btf(), 0, 0);
	if (!s || !s->ns)
		return 0;
	delta = bpf_ktime_get_ns() - s->ns;
	s->ns = 0;

	/* add it to the (cgroup, syscall) histogram and count it */
	key.cgroup_id = bpf_get_current_cgroup_id();
	key.nr = s->nr;
	ok = HIST_ADD(syscall_latency, &key, delta);
	hist_count(&syscall_latency_stats, SYSCALL_LATENCY_STREAM, ok);
	return 0;
}

SEC("raw_tp/sys_enter")
int BPF_PROG(raw_tp__sys_enter, struct pt_regs *regs, long id)
{
	return on_enter(id);
}

SEC("raw_tp/sys_exit")
int raw_tp__sys_exit(void *ctx)
{
	return on_exit();
}

SEC("tracepoint/raw_syscalls/sys_enter")
int tracepoint__raw_syscalls__sys_enter(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->id);
}

SEC("tracepoint/raw_syscalls/sys_exit")
int tracepoint__raw_syscalls__sys_exit(void *ctx)
{
	return on_exit();
}

char LICENSE[] SEC("license") = "GPL";
