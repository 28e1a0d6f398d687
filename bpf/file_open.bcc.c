// SPDX-License-Identifier: GPL-2.0
/* "file_open" probe for the bcc fallback loader: file_open.bpf.c's logic and records
 * (file_open.h), compiled by bcc at load time. Keep the two in step: the integration test
 * runs both and compares rows. Conventions (offsets, entry point names, tracefs) as in
 * process.bcc.c. Differences forced by bcc:
 *  - the prefix table, an array in .rodata with libbpf, arrives as FS_UNDER_PREFIX(head),
 *    a macro the loader writes from the configured prefixes: the same byte comparisons,
 *    unrolled (node_agent/probes/file_open.py: bcc_macros);
 *  - the in-flight map and its overflow counter are bcc tables, private to the programs;
 *  - syscall arguments are read from the saved user registers at offsets from the kernel's
 *    BTF (struct pt_regs), as PT_REGS_PARM*_CORE_SYSCALL reads them. */
#include "common.bcc.h"
#include "file_open.h"

#ifdef FS_KERNEL_HEADERS
#include <linux/sched.h>
#include <asm/ptrace.h>
#define FS_OFF_task_struct__thread_info __builtin_offsetof(struct task_struct, thread_info)
#define FS_OFF_thread_info__status __builtin_offsetof(struct thread_info, status)
#if defined(__x86_64__)
#define FS_OFF_pt_regs__orig_ax __builtin_offsetof(struct pt_regs, orig_ax)
#define FS_OFF_pt_regs__di __builtin_offsetof(struct pt_regs, di)
#define FS_OFF_pt_regs__si __builtin_offsetof(struct pt_regs, si)
#define FS_OFF_pt_regs__dx __builtin_offsetof(struct pt_regs, dx)
#define FS_OFF_pt_regs__r10 __builtin_offsetof(struct pt_regs, r10)
#elif defined(__aarch64__)
#define FS_OFF_pt_regs__syscallno __builtin_offsetof(struct pt_regs, syscallno)
#define FS_OFF_pt_regs__orig_x0 __builtin_offsetof(struct pt_regs, orig_x0)
#define FS_OFF_pt_regs__regs __builtin_offsetof(struct pt_regs, regs)
#endif
#else
typedef unsigned short umode_t; /* in the syscall tracepoints' records bcc generates */
#endif

/* syscall numbers, the syscall-number register and the argument registers, per
 * architecture (64-bit ABI only, as in file_open.bpf.c) */
#if defined(__x86_64__)
#define NR_OPENAT 257
#define NR_OPENAT2 437
#define NR_OPEN 2
#define NR_CREAT 85
#define TS_COMPAT 0x0002 /* arch/x86/include/asm/thread_info.h: a 32-bit syscall is active */
#define SYSCALL_NR(nr, regs) FS_READ(nr, regs, FS_OFF_pt_regs__orig_ax)
#define FS_OFF_PARM1 FS_OFF_pt_regs__di
#define FS_OFF_PARM2 FS_OFF_pt_regs__si
#define FS_OFF_PARM3 FS_OFF_pt_regs__dx
#define FS_OFF_PARM4 FS_OFF_pt_regs__r10
#elif defined(__aarch64__)
#define NR_OPENAT 56
#define NR_OPENAT2 437
#define NR_OPEN -1 /* arm64 has no open(2) and creat(2) */
#define NR_CREAT -1
#define SYSCALL_NR(nr, regs)                                                                  \
	do {                                                                                  \
		__s32 nr32 = 0;                                                               \
		FS_READ(nr32, regs, FS_OFF_pt_regs__syscallno);                               \
		nr = nr32;                                                                    \
	} while (0)
#define FS_OFF_PARM1 FS_OFF_pt_regs__orig_x0 /* x0 is the return value by now */
#define FS_OFF_PARM2 (FS_OFF_pt_regs__regs + 8)
#define FS_OFF_PARM3 (FS_OFF_pt_regs__regs + 16)
#define FS_OFF_PARM4 (FS_OFF_pt_regs__regs + 24)
#else
#error "file_open: add this architecture's syscall numbers"
#endif

#define AT_FDCWD -100
#define CREAT_FLAGS 01101 /* creat(2) is open(path, O_CREAT | O_WRONLY | O_TRUNC, mode) */
#define INFLIGHT_MAX 8192 /* threads inside an open at the same time (classic mode) */

/* knobs, as macros from the loader (the .rodata knobs of file_open.bpf.c) */
#ifndef capture_all
#define capture_all 0 /* every open, not only failures and prefixes */
#endif
#ifndef prefix_count
#define prefix_count 0 /* prefixes in use */
#endif
#ifndef FS_UNDER_PREFIX
#define FS_UNDER_PREFIX(head) 0 /* whether head starts with a configured prefix */
#endif

/* maps created by the loader (as file_open.bpf.c declares them): file_open_events (ring
 * buffer), file_open_stats (per-CPU struct stream_stats) */

/* The arguments of one open in flight, from its enter to its exit event (classic mode). */
struct open_args {
	__u64 path; /* user pointer to the path */
	__u64 how;  /* openat2: user pointer to struct open_how; 0 otherwise */
	__u32 flags;
	__u32 mode;
	__s32 dfd;
	__u16 syscall;
	__u16 pad;
};

/* pid_tgid -> the arguments of its open in flight */
BPF_HASH(file_open_inflight, __u64, struct open_args, INFLIGHT_MAX);

/* opens the enter program could not remember because file_open_inflight was full */
BPF_PERCPU_ARRAY(file_open_inflight_full, __u64, 1);

/* Apply the capture rule to one finished open and publish its record. */
FS_INLINE int emit(const struct open_args *a, long ret)
{
	struct file_open_event *e;
	const char *path = (const char *)a->path;
	struct {
		__u64 flags;
		__u64 mode;
	} how;
	char head[FILE_OPEN_PREFIX_LEN + 1]; /* + the NUL read_str always writes */
	long n;
	char c = 0;

	/* failures always; successes when all are wanted or the path is under a prefix */
	if (ret >= 0 && !capture_all) {
		if (!prefix_count)
			return 0;
		if (bpf_probe_read_user_str(head, sizeof(head), path) <= 0)
			return 0;
		if (!(FS_UNDER_PREFIX(head)))
			return 0;
	}

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(FS_MAP(file_open_events), sizeof(*e), FS_MAP(file_open_stats),
			   FILE_OPEN_STREAM);
	if (!e)
		return 0;

	/* who, when, what */
	e->time_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->tid = (__u32)bpf_get_current_pid_tgid();
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->flags = a->flags;
	e->mode = a->mode;
	e->ret = ret;
	e->dfd = a->dfd;
	e->syscall = a->syscall;
	e->rflags = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));

	/* openat2: flags and mode are in the caller's struct open_how */
	if (a->how) {
		if (!bpf_probe_read_user(&how, sizeof(how), (const void *)a->how)) {
			e->flags = how.flags;
			e->mode = how.mode;
		}
	}

	/* the path; reserved memory is not zeroed, so clear the field first */
	__builtin_memset(e->path, 0, sizeof(e->path));
	n = bpf_probe_read_user_str(e->path, sizeof(e->path), path);
	if (n < 0)
		e->rflags |= FILE_OPEN_PATH_UNREADABLE;
	else if (n == sizeof(e->path) &&
		 !bpf_probe_read_user(&c, 1, path + sizeof(e->path) - 1) && c)
		e->rflags |= FILE_OPEN_PATH_TRUNCATED;

	/* publish the record */
	stream_submit(FS_MAP(file_open_events), e);
	return 0;
}

/* raw_tp mode: every syscall's exit; the arguments come from the saved user registers.
 * TP_PROTO(struct pt_regs *regs, long ret) */
int raw_tp__sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
	unsigned long regs = ctx->args[0];
	long ret = (long)ctx->args[1];
	long nr = 0;
	unsigned long p1 = 0, p2 = 0, p3 = 0, p4 = 0;
	struct open_args a = {};

	/* the cheap test first: this runs for every syscall on the machine */
	SYSCALL_NR(nr, regs);
	if (nr != NR_OPENAT && nr != NR_OPENAT2 && nr != NR_OPEN && nr != NR_CREAT)
		return 0;
#if defined(__x86_64__)
	/* a 32-bit task's syscall numbers mean other syscalls */
	{
		__u32 status = 0;

		FS_READ(status, bpf_get_current_task(),
			FS_OFF_task_struct__thread_info + FS_OFF_thread_info__status);
		if (status & TS_COMPAT)
			return 0;
	}
#endif
	/* the configured pid / cgroup filters */
	if (!filter_pass())
		return 0;

	FS_READ(p1, regs, FS_OFF_PARM1);
	FS_READ(p2, regs, FS_OFF_PARM2);
	FS_READ(p3, regs, FS_OFF_PARM3);
	if (nr == NR_OPENAT || nr == NR_OPENAT2) {
		a.dfd = (int)p1;
		a.path = p2;
		if (nr == NR_OPENAT) {
			FS_READ(p4, regs, FS_OFF_PARM4);
			a.flags = p3;
			a.mode = p4;
			a.syscall = FILE_OPEN_OPENAT;
		} else {
			a.how = p3;
			a.syscall = FILE_OPEN_OPENAT2;
		}
	} else {
		a.dfd = AT_FDCWD;
		a.path = p1;
		if (nr == NR_OPEN) {
			a.flags = p2;
			a.mode = p3;
			a.syscall = FILE_OPEN_OPEN;
		} else {
			a.flags = CREAT_FLAGS;
			a.mode = p2;
			a.syscall = FILE_OPEN_CREAT;
		}
	}
	return emit(&a, ret);
}

#ifdef FS_TRACEPOINTS
/* classic mode: remember the arguments at entry, keyed by thread */
FS_INLINE int remember(struct open_args *a)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 zero = 0;
	__u64 *full;
	struct stream_stats *s;

	/* the configured pid / cgroup filters */
	if (!filter_pass())
		return 0;
	if (!file_open_inflight.update(&id, a))
		return 0;

	/* map full: this open cannot be followed; count it, never lose it silently */
	full = file_open_inflight_full.lookup(&zero);
	if (full)
		(*full)++;
	s = bpf_map_lookup_elem(FS_MAP(file_open_stats), &zero);
	if (s) {
		s->emitted++;
		s->dropped++;
	}
	return 0;
}

/* classic mode: the exit of an open whose arguments were remembered at entry */
FS_INLINE int finish(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct open_args *stored, a;

	/* none: the probe was attached while the syscall ran, or the pid/cgroup filter said no */
	stored = file_open_inflight.lookup(&id);
	if (!stored)
		return 0;
	a = *stored;
	file_open_inflight.delete(&id);
	return emit(&a, ret);
}

/* the syscall's arguments in a sys_enter_* record: unsigned long args[] after the common
 * fields and the syscall number (struct trace_event_raw_sys_enter); bcc names and types
 * them per syscall, this reads them as file_open.bpf.c does */
#define SYS_ARG(args, i) (((const unsigned long *)((const char *)(args) + 16))[i])

int tp__syscalls__sys_enter_openat(struct tracepoint__syscalls__sys_enter_openat *args)
{
	struct open_args a = {
		.dfd = (int)SYS_ARG(args, 0),
		.path = SYS_ARG(args, 1),
		.flags = (__u32)SYS_ARG(args, 2),
		.mode = (__u32)SYS_ARG(args, 3),
		.syscall = FILE_OPEN_OPENAT,
	};
	return remember(&a);
}

int tp__syscalls__sys_enter_openat2(struct tracepoint__syscalls__sys_enter_openat2 *args)
{
	struct open_args a = {
		.dfd = (int)SYS_ARG(args, 0),
		.path = SYS_ARG(args, 1),
		.how = SYS_ARG(args, 2),
		.syscall = FILE_OPEN_OPENAT2,
	};
	return remember(&a);
}

int tp__syscalls__sys_enter_open(struct tracepoint__syscalls__sys_enter_open *args)
{
	struct open_args a = {
		.dfd = AT_FDCWD,
		.path = SYS_ARG(args, 0),
		.flags = (__u32)SYS_ARG(args, 1),
		.mode = (__u32)SYS_ARG(args, 2),
		.syscall = FILE_OPEN_OPEN,
	};
	return remember(&a);
}

int tp__syscalls__sys_enter_creat(struct tracepoint__syscalls__sys_enter_creat *args)
{
	struct open_args a = {
		.dfd = AT_FDCWD,
		.path = SYS_ARG(args, 0),
		.flags = CREAT_FLAGS,
		.mode = (__u32)SYS_ARG(args, 1),
		.syscall = FILE_OPEN_CREAT,
	};
	return remember(&a);
}

int tp__syscalls__sys_exit_openat(struct tracepoint__syscalls__sys_exit_openat *args)
{
	return finish(args->ret);
}

int tp__syscalls__sys_exit_openat2(struct tracepoint__syscalls__sys_exit_openat2 *args)
{
	return finish(args->ret);
}

int tp__syscalls__sys_exit_open(struct tracepoint__syscalls__sys_exit_open *args)
{
	return finish(args->ret);
}

int tp__syscalls__sys_exit_creat(struct tracepoint__syscalls__sys_exit_creat *args)
{
	return finish(args->ret);
}
#endif
