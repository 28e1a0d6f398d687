// SPDX-License-Identifier: GPL-2.0
/* "oom_kills" probe for the bcc fallback loader: oom_kills.bpf.c's logic and records
 * (oom_kills.h), compiled by bcc at load time. Keep the two in step: the integration test
 * runs both and compares rows. Conventions (offsets, entry point names, tracefs) as in
 * process.bcc.c; the tracepoint record's fields that kernels added later (6.8: comm, uid,
 * memory figures) are tested with the loader's FS_TP_oom__mark_victim__<field> macros,
 * where oom_kills.bpf.c uses bpf_core_field_exists(). bcc lends no map to the process probe
 * (exit_join.bpf.h): victims are not stored for process_exit records, and
 * OOM_KILLS_IN_PROCESS_EXIT is never set, as with libbpf when the process probe does not run. */
#include "common.bcc.h"
#include "oom_kills.h"

#ifdef FS_KERNEL_HEADERS
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/mm_types.h>
#include <linux/cgroup-defs.h>
#include <linux/kernfs.h>
#define FS_OFF_task_struct__tgid __builtin_offsetof(struct task_struct, tgid)
#define FS_OFF_task_struct__comm __builtin_offsetof(struct task_struct, comm)
#define FS_OFF_task_struct__mm __builtin_offsetof(struct task_struct, mm)
#define FS_OFF_task_struct__signal __builtin_offsetof(struct task_struct, signal)
#define FS_OFF_task_struct__cgroups __builtin_offsetof(struct task_struct, cgroups)
#define FS_OFF_css_set__dfl_cgrp __builtin_offsetof(struct css_set, dfl_cgrp)
#define FS_OFF_cgroup__kn __builtin_offsetof(struct cgroup, kn)
#define FS_OFF_kernfs_node__id __builtin_offsetof(struct kernfs_node, id)
#define FS_OFF_signal_struct__oom_score_adj __builtin_offsetof(struct signal_struct, oom_score_adj)
#define FS_OFF_mm_struct__total_vm __builtin_offsetof(struct mm_struct, total_vm)
#define FS_OFF_mm_struct__pgtables_bytes __builtin_offsetof(struct mm_struct, pgtables_bytes)
#define FS_OFF_mm_struct__rss_stat __builtin_offsetof(struct mm_struct, rss_stat)
#define FS_SIZE_mm_struct__rss_stat sizeof(((struct mm_struct *)0)->rss_stat)
/* before 6.2: struct mm_rss_stat { atomic_long_t count[4]; } */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 2, 0)
#define FS_OFF_mm_rss_stat__count __builtin_offsetof(struct mm_rss_stat, count)
#else
#define FS_OFF_percpu_counter__count __builtin_offsetof(struct percpu_counter, count)
#endif
#endif

#ifndef page_shift
#define page_shift 12 /* log2(page size): mm counters are in pages */
#endif

/* maps, created by the loader (as oom_kills.bpf.c declares them): oom_kills_events (ring
 * buffer), oom_kills_stats (per-CPU struct stream_stats) */

/* MM_FILEPAGES, MM_ANONPAGES, MM_SWAPENTS, MM_SHMEMPAGES (include/linux/mm_types_task.h) */
enum { MM_FILE = 0, MM_ANON = 1, MM_SHMEM = 3, MM_COUNTERS = 4 };

/* get_mm_counter(): the counter's central value, negative read as 0, in pages */
FS_INLINE __u64 mm_counter(unsigned long mm, int member)
{
	long v = 0;

#ifdef FS_OFF_mm_rss_stat__count /* before 6.2: atomic_long_t count[] */
	FS_READ(v, mm, FS_OFF_mm_struct__rss_stat + FS_OFF_mm_rss_stat__count + member * 8);
#else /* 6.2+: struct percpu_counter rss_stat[] */
	FS_READ(v, mm,
		FS_OFF_mm_struct__rss_stat + member * (FS_SIZE_mm_struct__rss_stat / MM_COUNTERS) +
			FS_OFF_percpu_counter__count);
#endif
	return v > 0 ? v : 0;
}

/* The task whose allocation triggered the kill: the current task. */
FS_INLINE void fill_trigger(struct oom_kills_event *e)
{
	e->time_ns = bpf_ktime_get_boot_ns();
	e->trigger_pid = bpf_get_current_pid_tgid() >> 32;
	e->trigger_cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->trigger_comm, sizeof(e->trigger_comm));
}

/* 6.8+: TP_PROTO(struct task_struct *task, uid_t uid); reading uid makes the attach fail on
 * older kernels (one argument), where the classic tracepoint is tried */
int raw_tp__mark_victim(struct bpf_raw_tracepoint_args *ctx)
{
	unsigned long task = ctx->args[0];
	unsigned long mm = 0, ptr = 0, signal = 0;
	struct oom_kills_event *e;
	__u32 tgid = 0, kb_shift = page_shift - 10;
	__u64 v = 0;
	__s16 adj = 0;

	FS_READ(tgid, task, FS_OFF_task_struct__tgid);

	/* the configured pid / cgroup filters: the victim's pid, the trigger's cgroup */
	if (targ_tgid && tgid != targ_tgid)
		return 0;
	if (filter_cgroup && bpf_current_task_under_cgroup(FS_MAP(cgroup_filter), 0) != 1)
		return 0;

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(FS_MAP(oom_kills_events), sizeof(*e), FS_MAP(oom_kills_stats),
			   OOM_KILLS_STREAM);
	if (!e)
		return 0;

	fill_trigger(e);
	e->pid = tgid;
	e->uid = (__u32)ctx->args[1];
	e->flags = 0;
	/* task->cgroups->dfl_cgrp->kn->id */
	FS_READ(ptr, task, FS_OFF_task_struct__cgroups);
	FS_READ(ptr, ptr, FS_OFF_css_set__dfl_cgrp);
	FS_READ(ptr, ptr, FS_OFF_cgroup__kn);
	FS_READ(v, ptr, FS_OFF_kernfs_node__id);
	e->cgroup_id = v;
	FS_READ(signal, task, FS_OFF_task_struct__signal);
	FS_READ(adj, signal, FS_OFF_signal_struct__oom_score_adj);
	e->oom_score_adj = adj;
	__builtin_memset(e->comm, 0, sizeof(e->comm));
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm),
				  (void *)(task + FS_OFF_task_struct__comm));

	/* the figures mark_victim logs: pages -> KiB, page tables bytes -> KiB */
	FS_READ(mm, task, FS_OFF_task_struct__mm);
	if (mm) {
		v = 0;
		FS_READ(v, mm, FS_OFF_mm_struct__total_vm);
		e->total_vm_kb = v << kb_shift;
		e->anon_rss_kb = mm_counter(mm, MM_ANON) << kb_shift;
		e->file_rss_kb = mm_counter(mm, MM_FILE) << kb_shift;
		e->shmem_rss_kb = mm_counter(mm, MM_SHMEM) << kb_shift;
		v = 0;
		FS_READ(v, mm, FS_OFF_mm_struct__pgtables_bytes);
		e->pgtables_kb = v >> 10;
	} else {
		e->total_vm_kb = e->anon_rss_kb = e->file_rss_kb = 0;
		e->shmem_rss_kb = e->pgtables_kb = 0;
	}

	/* publish the record */
	stream_submit(FS_MAP(oom_kills_events), e);
	return 0;
}

#ifdef FS_TRACEPOINTS
int tp__oom__mark_victim(struct tracepoint__oom__mark_victim *args)
{
	struct oom_kills_event *e;
	__u64 id = bpf_get_current_pid_tgid();
	__u32 pid = args->pid; /* the victim task's pid (a thread id) */
	bool is_current = pid == (__u32)id;
	__u32 tgid = is_current ? id >> 32 : pid;

	/* the configured pid / cgroup filters: the victim's pid, the trigger's cgroup */
	if (targ_tgid && tgid != targ_tgid)
		return 0;
	if (filter_cgroup && bpf_current_task_under_cgroup(FS_MAP(cgroup_filter), 0) != 1)
		return 0;

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(FS_MAP(oom_kills_events), sizeof(*e), FS_MAP(oom_kills_stats),
			   OOM_KILLS_STREAM);
	if (!e)
		return 0;

	fill_trigger(e);
	e->pid = tgid;
	e->cgroup_id = is_current ? e->trigger_cgroup_id : 0;
	e->flags = 0;
	__builtin_memset(e->comm, 0, sizeof(e->comm));

	/* 6.8 added the victim's comm, uid and memory figures (already KiB) */
#ifdef FS_TP_oom__mark_victim__comm
	/* __data_loc: the low 16 bits are the string's offset from the record start */
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm),
				  (void *)args + (args->data_loc_comm & 0xFFFF));
#else
	if (is_current)
		bpf_get_current_comm(e->comm, sizeof(e->comm));
#endif
#ifdef FS_TP_oom__mark_victim__anon_rss
	e->total_vm_kb = args->total_vm;
	e->anon_rss_kb = args->anon_rss;
	e->file_rss_kb = args->file_rss;
	e->shmem_rss_kb = args->shmem_rss;
	e->pgtables_kb = args->pgtables;
#else
	e->total_vm_kb = e->anon_rss_kb = e->file_rss_kb = 0;
	e->shmem_rss_kb = e->pgtables_kb = 0;
	e->flags |= OOM_KILLS_NO_FIGURES;
#endif
#ifdef FS_TP_oom__mark_victim__uid
	e->uid = args->uid;
#else
	e->uid = 0;
#endif
#ifdef FS_TP_oom__mark_victim__oom_score_adj
	e->oom_score_adj = args->oom_score_adj;
#else
	e->oom_score_adj = 0;
#endif

	/* publish the record */
	stream_submit(FS_MAP(oom_kills_events), e);
	return 0;
}
#endif
