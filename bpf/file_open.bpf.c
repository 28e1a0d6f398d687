// SPDX-License-Identifier: GPL-2.0
/* "file_open" probe: open, openat, openat2 and creat with path, flags, mode and result.
 *
 * Two ways to see an open, the loader takes the first that attaches:
 *  - classic syscall tracepoints (syscalls:sys_enter_* / sys_exit_*, need tracefs; bcc can
 *    compile them): they fire for these syscalls only. The exit event carries only the
 *    result, so the enter program keeps the arguments in a per-thread hash map.
 *  - raw_tp/sys_exit alone: it fires for every syscall, so it filters on the syscall
 *    number first. At syscall exit the saved user registers still hold the arguments
 *    (only the return register changed; arm64 keeps the first argument in orig_x0), so no
 *    enter program and no map are needed: half the per-syscall cost of an enter/exit pair.
 * Either way the path is read from user memory at exit: getname() has faulted the
 * string in by then, while a read at entry fails on a page not yet resident.
 *
 * Capture rule: failed opens (result < 0), paths under one of the configured prefixes,
 * or every open when capture_all is set. Prefixes live in .rodata (const volatile), set
 * before load: no map lookup per open, and the loops below have constant bounds. */
#include "common.bpf.h"
#include "file_open.h"

/* syscall numbers and the syscall-number register, per architecture (64-bit ABI only;
 * classic syscall tracepoints ignore 32-bit compat syscalls as well) */
#if defined(__TARGET_ARCH_x86)
#define NR_OPENAT 257
#define NR_OPENAT2 437
#define NR_OPEN 2
#define NR_CREAT 85
#define TS_COMPAT 0x0002 /* arch/x86/include/asm/thread_info.h: a 32-bit syscall is active */
#define SYSCALL_NR(regs) BPF_CORE_READ(regs, orig_ax)
#elif defined(__TARGET_ARCH_arm64)
#define NR_OPENAT 56
#define NR_OPENAT2 437
#define NR_OPEN -1 /* arm64 has no open(2) and creat(2) */
#define NR_CREAT -1
#define SYSCALL_NR(regs) BPF_CORE_READ(regs, syscallno)
#else
#error "file_open: add this architecture's syscall numbers"
#endif

#define AT_FDCWD -100
#define CREAT_FLAGS 01101 /* creat(2) is open(path, O_CREAT | O_WRONLY | O_TRUNC, mode) */
#define INFLIGHT_MAX 8192 /* threads inside an open at the same time (classic mode) */

/* knobs, written into .rodata by the loader before load */
const volatile bool capture_all = false; /* every open, not only failures and prefixes */
const volatile __u32 prefix_count = 0;   /* prefixes in use, <= FILE_OPEN_PREFIXES */
const volatile __u32 prefix_lens[FILE_OPEN_PREFIXES] = {};
const volatile char prefixes[FILE_OPEN_PREFIXES][FILE_OPEN_PREFIX_LEN] = {};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* default; the loader sets it before load */
} file_open_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FILE_OPEN_STREAM_COUNT);
	__type(key, __u32);
	__type(value, struct stream_stats);
} file_open_stats SEC(".maps");

/* The arguments of one open in flight, from its enter to its exit event (classic mode). */
struct open_args {
	__u64 path;  /* user pointer to the path */
	__u64 how;   /* openat2: user pointer to struct open_how; 0 otherwise */
	__u32 flags;
	__u32 mode;
	__s32 dfd;
	__u16 syscall;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, INFLIGHT_MAX);
	__type(key, __u64); /* pid_tgid */
	__type(value, struct open_args);
} file_open_inflight SEC(".maps");

/* Opens the enter program could not remember because file_open_inflight was full; each
 * is also counted as emitted and dropped in file_open_stats (it may have qualified). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} file_open_inflight_full SEC(".maps");

/* keep the record type in the object's BTF: user space builds its dtype from it */
const struct file_open_event *unused_file_open_event __attribute__((unused));

/* Whether the path's first bytes (head, NUL terminated) start with a configured prefix. */
static __always_inline bool under_prefix(const char *head)
{
	__u32 i, j, len;

	for (i = 0; i < FILE_OPEN_PREFIXES; i++) {
		if (i >= prefix_count)
			break;
		len = prefix_lens[i];
		for (j = 0; j < FILE_OPEN_PREFIX_LEN; j++) {
			if (j >= len)
				return true;
			if (head[j] != prefixes[i][j])
				break;
		}
		if (j == FILE_OPEN_PREFIX_LEN)
			return true; /* a prefix of exactly FILE_OPEN_PREFIX_LEN bytes matched */
	}
	return false;
}

/* Apply the capture rule to one finished open and publish its record. */
static __always_inline int emit(const struct open_args *a, long ret)
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
		if (!under_prefix(head))
			return 0;
	}

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(&file_open_events, sizeof(*e), &file_open_stats, FILE_OPEN_STREAM);
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
	stream_submit(&file_open_events, e);
	return 0;
}

/* classic mode: remember the arguments at entry, keyed by thread */
static __always_inline int remember(struct open_args *a)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 zero = 0;
	__u64 *full;
	struct stream_stats *s;

	/* the configured pid / cgroup filters */
	if (!filter_pass())
		return 0;
	if (!bpf_map_update_elem(&file_open_inflight, &id, a, BPF_ANY))
		return 0;

	/* map full: this open cannot be followed; count it, never lose it silently */
	full = bpf_map_lookup_elem(&file_open_inflight_full, &zero);
	if (full)
		(*full)++;
	s = bpf_map_lookup_elem(&file_open_stats, &zero);
	if (s) {
		s->emitted++;
		s->dropped++;
	}
	return 0;
}

/* classic mode: the exit of an open whose arguments were remembered at entry */
static __always_inline int finish(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct open_args *stored, a;

	/* none: the probe was attached while the syscall ran, or the pid/cgroup filter said no */
	stored = bpf_map_lookup_elem(&file_open_inflight, &id);
	if (!stored)
		return 0;
	a = *stored;
	bpf_map_delete_elem(&file_open_inflight, &id);
	return emit(&a, ret);
}

SEC("tracepoint/syscalls/sys_enter_openat")
int tracepoint__syscalls__sys_enter_openat(struct trace_event_raw_sys_enter *ctx)
{
	struct open_args a = {
		.dfd = (int)ctx->args[0],
		.path = ctx->args[1],
		.flags = (__u32)ctx->args[2],
		.mode = (__u32)ctx->args[3],
		.syscall = FILE_OPEN_OPENAT,
	};
	return remember(&a);
}

SEC("tracepoint/syscalls/sys_enter_openat2")
int tracepoint__syscalls__sys_enter_openat2(struct trace_event_raw_sys_enter *ctx)
{
	struct open_args a = {
		.dfd = (int)ctx->args[0],
		.path = ctx->args[1],
		.how = ctx->args[2],
		.syscall = FILE_OPEN_OPENAT2,
	};
	return remember(&a);
}

SEC("tracepoint/syscalls/sys_enter_open")
int tracepoint__syscalls__sys_enter_open(struct trace_event_raw_sys_enter *ctx)
{
	struct open_args a = {
		.dfd = AT_FDCWD,
		.path = ctx->args[0],
		.flags = (__u32)ctx->args[1],
		.mode = (__u32)ctx->args[2],
		.syscall = FILE_OPEN_OPEN,
	};
	return remember(&a);
}

SEC("tracepoint/syscalls/sys_enter_creat")
int tracepoint__syscalls__sys_enter_creat(struct trace_event_raw_sys_enter *ctx)
{
	struct open_args a = {
		.dfd = AT_FDCWD,
		.path = ctx->args[0],
		.flags = CREAT_FLAGS,
		.mode = (__u32)ctx->args[1],
		.syscall = FILE_OPEN_CREAT,
	};
	return remember(&a);
}

SEC("tracepoint/syscalls/sys_exit_openat")
int tracepoint__syscalls__sys_exit_openat(struct trace_event_raw_sys_exit *ctx)
{
	return finish(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_openat2")
int tracepoint__syscalls__sys_exit_openat2(struct trace_event_raw_sys_exit *ctx)
{
	return finish(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_open")
int tracepoint__syscalls__sys_exit_open(struct trace_event_raw_sys_exit *ctx)
{
	return finish(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_creat")
int tracepoint__syscalls__sys_exit_creat(struct trace_event_raw_sys_exit *ctx)
{
	return finish(ctx->ret);
}

/* raw_tp mode: every syscall's exit; the arguments come from the saved user registers */
SEC("raw_tp/sys_exit")
int BPF_PROG(raw_tp__sys_exit, struct pt_regs *regs, long ret)
{
	long nr = SYSCALL_NR(regs);
	struct open_args a = {};

	/* the cheap test first: this runs for every syscall on the machine */
	if (nr != NR_OPENAT && nr != NR_OPENAT2 && nr != NR_OPEN && nr != NR_CREAT)
		return 0;
#if defined(__TARGET_ARCH_x86)
	/* a 32-bit task's syscall numbers mean other syscalls */
	{
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();

		if (BPF_CORE_READ(task, thread_info.status) & TS_COMPAT)
			return 0;
	}
#endif
	/* the configured pid / cgroup filters */
	if (!filter_pass())
		return 0;

	if (nr == NR_OPENAT || nr == NR_OPENAT2) {
		a.dfd = (int)PT_REGS_PARM1_CORE_SYSCALL(regs);
		a.path = PT_REGS_PARM2_CORE_SYSCALL(regs);
		if (nr == NR_OPENAT) {
			a.flags = PT_REGS_PARM3_CORE_SYSCALL(regs);
			a.mode = PT_REGS_PARM4_CORE_SYSCALL(regs);
			a.syscall = FILE_OPEN_OPENAT;
		} else {
			a.how = PT_REGS_PARM3_CORE_SYSCALL(regs);
			a.syscall = FILE_OPEN_OPENAT2;
		}
	} else {
		a.dfd = AT_FDCWD;
		a.path = PT_REGS_PARM1_CORE_SYSCALL(regs);
		if (nr == NR_OPEN) {
			a.flags = PT_REGS_PARM2_CORE_SYSCALL(regs);
			a.mode = PT_REGS_PARM3_CORE_SYSCALL(regs);
			a.syscall = FILE_OPEN_OPEN;
		} else {
			a.flags = CREAT_FLAGS;
			a.mode = PT_REGS_PARM2_CORE_SYSCALL(regs);
			a.syscall = FILE_OPEN_CREAT;
		}
	}
	return emit(&a, ret);
}

char LICENSE[] SEC("license") = "GPL";
