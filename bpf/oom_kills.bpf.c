// SPDX-License-Identifier: GPL-2.0
/* "oom_kills" probe: OOM victims from the oom:mark_victim tracepoint, with the victim's
 * memory figures (the numbers of the kernel's "Killed process" log line).
 *
 * The OOM killer runs in the context of the task whose allocation ran out (the trigger),
 * which is often but not always the victim. Two entry points:
 *  - raw_tp/mark_victim gets the victim's task_struct (6.8+: (task, uid)), so every field,
 *    the victim's cgroup included, is read from the victim itself. It reads the uid
 *    argument, so on older kernels (one int argument) it fails to attach instead of
 *    misreading the pid as a pointer, and the classic tracepoint is tried.
 *  - the classic tracepoint (needs tracefs; bcc can compile it) has the victim's pid, comm
 *    and figures but no task: the victim's cgroup is known only when the victim is the
 *    trigger itself, otherwise cgroup_id is 0.
 * raw_tp is listed first: it is the exact one. The pid filter applies to the victim; the
 * cgroup filter, which can only test the current task, to the trigger.
 *
 * Each victim is also stored in oom_victims, keyed by its pid and start time, which the
 * process probe's exit program reads when the loader made it share the map
 * (exit_join.bpf.h): the victim's process_exit record then carries the kill. */
#include "common.bpf.h"
#include "oom_kills.h"
#define EXIT_JOIN_OOM_VICTIMS
#include "exit_join.bpf.h"

/* knobs, written into .rodata by the loader before load */
const volatile __u32 page_shift = 12; /* log2(page size): mm counters are in pages */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 16); /* default; the loader sets it before load */
} oom_kills_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, OOM_KILLS_STREAM_COUNT);
	__type(key, __u32);
	__type(value, struct stream_stats);
} oom_kills_stats SEC(".maps");

/* slot 0: 1 while the process probe runs with oom_victims shared (set by the loader after
 * it attached), so a victim stored from then on reaches its process_exit record */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} oom_kills_joined SEC(".maps");

/* keep the record type in the object's BTF: user space builds its dtype from it */
const struct oom_kills_event *unused_oom_kills_event __attribute__((unused));

/* mm counters before 6.2, when they were atomics instead of percpu_counters */
struct mm_rss_stat___old {
	atomic_long_t count[4];
} __attribute__((preserve_access_index));

struct mm_struct___old {
	struct mm_rss_stat___old rss_stat;
} __attribute__((preserve_access_index));

/* MM_FILEPAGES, MM_ANONPAGES, MM_SWAPENTS, MM_SHMEMPAGES (include/linux/mm_types_task.h) */
enum { MM_FILE = 0, MM_ANON = 1, MM_SHMEM = 3 };

/* get_mm_counter(): the counter's central value, negative read as 0, in pages */
static __always_inline __u64 mm_counter(struct mm_struct *mm, int member)
{
	long v;

	if (bpf_core_type_exists(struct mm_rss_stat___old))
		v = BPF_CORE_READ((struct mm_struct___old *)mm, rss_stat.count[member].counter);
	else
		v = BPF_CORE_READ(mm, rss_stat[member].count);
	return v > 0 ? v : 0;
}

/* Store the victim (tgid, leader's start time) for its process_exit record; flag the record
 * when the process probe reads the map and the leader's exit is still to come: a leader with
 * an mm has not reached exit_mm(), which precedes its sched_process_exit (the OOM killer
 * picks a thread with an mm, which need not be the leader). A leader already past it may or
 * may not have looked: the record keeps the kill (a second report rather than none). */
static __always_inline void remember_victim(struct oom_kills_event *e, struct task_struct *leader)
{
	struct oom_victim_key key = { .start_ns = BPF_CORE_READ(leader, start_boottime), .tgid = e->pid };
	struct oom_victim v = {
		.time_ns = e->time_ns,
		.total_vm_kb = e->total_vm_kb,
		.anon_rss_kb = e->anon_rss_kb,
		.file_rss_kb = e->file_rss_kb,
		.shmem_rss_kb = e->shmem_rss_kb,
		.pgtables_kb = e->pgtables_kb,
		.trigger_pid = e->trigger_pid,
		.oom_score_adj = e->oom_score_adj,
	};
	__u32 zero = 0, *joined;

	if (bpf_map_update_elem(&oom_victims, &key, &v, BPF_ANY))
		return;
	joined = bpf_map_lookup_elem(&oom_kills_joined, &zero);
	if (joined && *joined && BPF_CORE_READ(leader, mm))
		e->flags |= OOM_KILLS_IN_PROCESS_EXIT;
}

/* The task whose allocation triggered the kill: the current task. */
static __always_inline void fill_trigger(struct oom_kills_event *e)
{
	e->time_ns = bpf_ktime_get_boot_ns();
	e->trigger_pid = bpf_get_current_pid_tgid() >> 32;
	e->trigger_cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->trigger_comm, sizeof(e->trigger_comm));
}

SEC("raw_tp/mark_victim")
int BPF_PROG(raw_tp__mark_victim, struct task_struct *task, uid_t uid)
{
	struct oom_kills_event *e;
	struct mm_struct *mm;
	__u32 tgid = BPF_CORE_READ(task, tgid);
	__u32 kb_shift = page_shift - 10;

	/* the configured pid / cgroup filters: the victim's pid, the trigger's cgroup */
	if (targ_tgid && tgid != targ_tgid)
		return 0;
	if (filter_cgroup && bpf_current_task_under_cgroup(&cgroup_filter, 0) != 1)
		return 0;

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(&oom_kills_events, sizeof(*e), &oom_kills_stats, OOM_KILLS_STREAM);
	if (!e)
		return 0;

	fill_trigger(e);
	e->pid = tgid;
	e->uid = uid;
	e->flags = 0;
	e->cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	e->oom_score_adj = BPF_CORE_READ(task, signal, oom_score_adj);
	__builtin_memset(e->comm, 0, sizeof(e->comm));
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), task->comm);

	/* the figures mark_victim logs: pages -> KiB, page tables bytes -> KiB */
	mm = BPF_CORE_READ(task, mm);
	if (mm) {
		e->total_vm_kb = BPF_CORE_READ(mm, total_vm) << kb_shift;
		e->anon_rss_kb = mm_counter(mm, MM_ANON) << kb_shift;
		e->file_rss_kb = mm_counter(mm, MM_FILE) << kb_shift;
		e->shmem_rss_kb = mm_counter(mm, MM_SHMEM) << kb_shift;
		e->pgtables_kb = BPF_CORE_READ(mm, pgtables_bytes.counter) >> 10;
	} else {
		e->total_vm_kb = e->anon_rss_kb = e->file_rss_kb = 0;
		e->shmem_rss_kb = e->pgtables_kb = 0;
	}

	/* hand the kill to the victim's process_exit record */
	remember_victim(e, BPF_CORE_READ(task, group_leader));

	/* publish the record */
	stream_submit(&oom_kills_events, e);
	return 0;
}

SEC("tracepoint/oom/mark_victim")
int tracepoint__oom__mark_victim(struct trace_event_raw_mark_victim *ctx)
{
	struct oom_kills_event *e;
	__u64 id = bpf_get_current_pid_tgid();
	__u32 pid = ctx->pid; /* the victim task's pid (a thread id) */
	bool is_current = pid == (__u32)id;
	__u32 tgid = is_current ? id >> 32 : pid;

	/* the configured pid / cgroup filters: the victim's pid, the trigger's cgroup */
	if (targ_tgid && tgid != targ_tgid)
		return 0;
	if (filter_cgroup && bpf_current_task_under_cgroup(&cgroup_filter, 0) != 1)
		return 0;

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(&oom_kills_events, sizeof(*e), &oom_kills_stats, OOM_KILLS_STREAM);
	if (!e)
		return 0;

	fill_trigger(e);
	e->pid = tgid;
	e->cgroup_id = is_current ? e->trigger_cgroup_id : 0;
	e->flags = 0;
	__builtin_memset(e->comm, 0, sizeof(e->comm));

	/* 6.8 added the victim's comm, uid and memory figures (already KiB); each field is
	 * tested on its own */
	if (bpf_core_field_exists(ctx->__data_loc_comm))
		bpf_probe_read_kernel_str(e->comm, sizeof(e->comm),
					  (void *)ctx + (ctx->__data_loc_comm & 0xFFFF));
	else if (is_current)
		bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->total_vm_kb = bpf_core_field_exists(ctx->total_vm) ? ctx->total_vm : 0;
	e->anon_rss_kb = bpf_core_field_exists(ctx->anon_rss) ? ctx->anon_rss : 0;
	e->file_rss_kb = bpf_core_field_exists(ctx->file_rss) ? ctx->file_rss : 0;
	e->shmem_rss_kb = bpf_core_field_exists(ctx->shmem_rss) ? ctx->shmem_rss : 0;
	e->pgtables_kb = bpf_core_field_exists(ctx->pgtables) ? ctx->pgtables : 0;
	e->uid = bpf_core_field_exists(ctx->uid) ? ctx->uid : 0;
	e->oom_score_adj = bpf_core_field_exists(ctx->oom_score_adj) ? ctx->oom_score_adj : 0;
	if (!bpf_core_field_exists(ctx->anon_rss))
		e->flags |= OOM_KILLS_NO_FIGURES;

	/* hand the kill to the victim's process_exit record: only a victim that is the current
	 * task has a known start time here */
	if (is_current)
		remember_victim(e, BPF_CORE_READ((struct task_struct *)bpf_get_current_task(), group_leader));

	/* publish the record */
	stream_submit(&oom_kills_events, e);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
