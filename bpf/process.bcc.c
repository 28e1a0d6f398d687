// SPDX-License-Identifier: GPL-2.0
/* "process" probe for the bcc fallback loader: process.bpf.c's logic and records
 * (process.h), compiled by bcc at load time. Keep the two in step: the integration test
 * runs both and compares rows.
 *
 * Kernel struct fields are read at FS_OFF_<struct>__<field>: with kernel BTF the loader
 * passes them from /sys/kernel/btf/vmlinux (the offsets CO-RE would relocate to);
 * without BTF (FS_KERNEL_HEADERS) they come from the running kernel's own headers, which
 * must match it. Entry points follow the libbpf program names, except that classic
 * tracepoints are tp__<category>__<event> (bcc would auto-attach tracepoint__*); the
 * tracepoint ones exist only when tracefs is mounted (FS_TRACEPOINTS), as bcc builds
 * their argument struct from the tracefs format file. */
#include "common.bcc.h"
#include "process.h"

#ifdef FS_KERNEL_HEADERS
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/mm_types.h>
#include <linux/binfmts.h>
#define FS_OFF_task_struct__real_parent __builtin_offsetof(struct task_struct, real_parent)
#define FS_OFF_task_struct__tgid __builtin_offsetof(struct task_struct, tgid)
#define FS_OFF_task_struct__mm __builtin_offsetof(struct task_struct, mm)
#define FS_OFF_task_struct__signal __builtin_offsetof(struct task_struct, signal)
#define FS_OFF_task_struct__exit_code __builtin_offsetof(struct task_struct, exit_code)
#define FS_OFF_task_struct__start_boottime __builtin_offsetof(struct task_struct, start_boottime)
#define FS_OFF_mm_struct__arg_start __builtin_offsetof(struct mm_struct, arg_start)
#define FS_OFF_mm_struct__arg_end __builtin_offsetof(struct mm_struct, arg_end)
#define FS_OFF_linux_binprm__filename __builtin_offsetof(struct linux_binprm, filename)
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 16, 0) /* signal_struct.group_exec_task */
#define FS_OFF_signal_struct__group_exec_task \
	__builtin_offsetof(struct signal_struct, group_exec_task)
#endif
#endif

#ifndef args_max
#define args_max 512 /* bytes of argv to copy, clamped to PROCESS_ARGS_MAX */
#endif

/* maps, created by the loader (as process.bpf.c declares them): process_exec_events,
 * process_exit_events (ring buffers), process_stats (per-CPU struct stream_stats) */

FS_INLINE int handle_exec(unsigned long filename)
{
	unsigned long task = bpf_get_current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct process_exec_event *e;
	unsigned long parent = 0, mm = 0, arg_start = 0, arg_end = 0, len;
	__u32 n, i, zeros, argc = 0, ppid = 0;
	char c = 0;
	long ret;

	/* the configured pid / cgroup filters */
	if (!filter_pass())
		return 0;

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(FS_MAP(process_exec_events), sizeof(*e), FS_MAP(process_stats),
			   PROCESS_STREAM_EXEC);
	if (!e)
		return 0;

	/* who and where */
	e->time_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = tgid;
	FS_READ(parent, task, FS_OFF_task_struct__real_parent);
	FS_READ(ppid, parent, FS_OFF_task_struct__tgid);
	e->ppid = ppid;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->flags = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));

	/* reserved memory is not zeroed: clear each string field before filling it */
	__builtin_memset(e->filename, 0, sizeof(e->filename));

	/* filename as passed to execve; a full buffer whose source goes on is truncated */
	ret = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), (void *)filename);
	if (ret == sizeof(e->filename) &&
	    !bpf_probe_read_kernel(&c, 1, (void *)(filename + sizeof(e->filename) - 1)) && c)
		e->flags |= PROCESS_EXEC_FILENAME_TRUNCATED;

	/* argv strings of the new image: mm->arg_start..arg_end, NUL separated */
	FS_READ(mm, task, FS_OFF_task_struct__mm);
	FS_READ(arg_start, mm, FS_OFF_mm_struct__arg_start);
	FS_READ(arg_end, mm, FS_OFF_mm_struct__arg_end);
	len = arg_end > arg_start ? arg_end - arg_start : 0;
	n = len < args_max ? len : args_max;
	if (n > PROCESS_ARGS_MAX)
		n = PROCESS_ARGS_MAX;
	__builtin_memset(e->args, 0, sizeof(e->args));
	if (n && bpf_probe_read_user(e->args, n, (void *)arg_start))
		n = 0;
	e->args_len = n;
	if (len > n)
		e->flags |= PROCESS_EXEC_ARGS_TRUNCATED;

	/* count the arguments in the copy: one per NUL, plus a cut-off last one. Unlike
	 * process.bpf.c's byte loop, which bcc's clang compiles into code the verifier cannot
	 * bound, a word at a time without branches: args[n..] are the memset's zeros, so the
	 * NULs in args[0..n) are all zero bytes less PROCESS_ARGS_MAX - n. */
	zeros = 0;
	for (i = 0; i < PROCESS_ARGS_MAX / 8; i++) {
		__u64 w = *(__u64 *)(e->args + i * 8);

		/* 0x80 in each zero byte of w, 0 elsewhere (exact: no carries between bytes) */
		w = ~(((w & 0x7f7f7f7f7f7f7f7fULL) + 0x7f7f7f7f7f7f7f7fULL) | w | 0x7f7f7f7f7f7f7f7fULL);
		zeros += ((w >> 7) * 0x0101010101010101ULL) >> 56;
	}
	argc = zeros - (PROCESS_ARGS_MAX - n);
	if (n && e->args[(n - 1) & (PROCESS_ARGS_MAX - 1)])
		argc++;
	e->argc = argc;

	/* publish the record */
	stream_submit(FS_MAP(process_exec_events), e);
	return 0;
}

FS_INLINE int handle_exit(void)
{
	unsigned long task = bpf_get_current_task();
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	struct process_exit_event *e;
	unsigned long parent = 0, exec_task = 0, signal = 0;
	__u64 start = 0;
	__u32 ppid = 0;
	int code = 0;

	/* a process ends with its thread-group leader; other threads' exits are skipped */
	if (tgid != (__u32)id)
		return 0;

	/* the configured pid / cgroup filters */
	if (!filter_pass())
		return 0;

	/* an old leader killed by another thread's execve (de_thread) is no process exit */
#ifdef FS_OFF_signal_struct__group_exec_task
	FS_READ(signal, task, FS_OFF_task_struct__signal);
	FS_READ(exec_task, signal, FS_OFF_signal_struct__group_exec_task);
#endif
	if (exec_task && exec_task != task)
		return 0;

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(FS_MAP(process_exit_events), sizeof(*e), FS_MAP(process_stats),
			   PROCESS_STREAM_EXIT);
	if (!e)
		return 0;

	/* who, when and for how long (both clocks are boot time, ns) */
	e->time_ns = bpf_ktime_get_boot_ns();
	FS_READ(start, task, FS_OFF_task_struct__start_boottime);
	e->duration_ns = e->time_ns - start;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = tgid;
	FS_READ(parent, task, FS_OFF_task_struct__real_parent);
	FS_READ(ppid, parent, FS_OFF_task_struct__tgid);
	e->ppid = ppid;
	bpf_get_current_comm(e->comm, sizeof(e->comm));

	/* do_exit stored the wait status before this tracepoint: code << 8 or signal */
	FS_READ(code, task, FS_OFF_task_struct__exit_code);
	e->exit_code = (code >> 8) & 0xff;
	e->signal = code & 0x7f;

	/* the OOM kill and signal sender fields stay zero: bcc shares no maps with the
	 * oom_kills / fatal_signals probes (exit_join.bpf.h); reserved memory is not zeroed */
	e->flags = 0;
	e->oom_delay_ns = e->oom_total_vm_kb = e->oom_anon_rss_kb = e->oom_file_rss_kb = 0;
	e->oom_shmem_rss_kb = e->oom_pgtables_kb = e->signal_delay_ns = 0;
	e->oom_trigger_pid = e->signal_sender_pid = e->signal_sender_uid = 0;
	e->signal_code = 0;
	e->oom_score_adj = 0;
	e->pad = 0;
	__builtin_memset(e->signal_sender_comm, 0, sizeof(e->signal_sender_comm));

	/* publish the record */
	stream_submit(FS_MAP(process_exit_events), e);
	return 0;
}

#ifdef FS_TRACEPOINTS
int tp__sched__sched_process_exec(struct tracepoint__sched__sched_process_exec *args)
{
	/* __data_loc: the low 16 bits are the string's offset from the record start */
	return handle_exec((unsigned long)args + (args->data_loc_filename & 0xFFFF));
}

int tp__sched__sched_process_exit(struct tracepoint__sched__sched_process_exit *args)
{
	return handle_exit();
}
#endif

/* TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm) */
int raw_tp__sched_process_exec(struct bpf_raw_tracepoint_args *ctx)
{
	unsigned long filename = 0;

	FS_READ(filename, ctx->args[2], FS_OFF_linux_binprm__filename);
	return handle_exec(filename);
}

int raw_tp__sched_process_exit(struct bpf_raw_tracepoint_args *ctx)
{
	return handle_exit();
}
