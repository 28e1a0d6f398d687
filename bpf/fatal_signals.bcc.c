// SPDX-License-Identifier: GPL-2.0
/* "fatal_signals" probe for the bcc fallback loader: fatal_signals.bpf.c's logic and records
 * (fatal_signals.h), compiled by bcc at load time. Keep the two in step: the integration
 * test runs both and compares rows. Conventions (offsets, entry point names, tracefs) as in
 * process.bcc.c. The two maps private to the programs (senders, reported) are bcc tables;
 * the loader creates the ring and the stats map. bcc lends no map to the process probe
 * (exit_join.bpf.h), so FATAL_SIGNALS_IN_PROCESS_EXIT is never set here, as with libbpf
 * when the process probe does not run. */
#include "common.bcc.h"
#include "fatal_signals.h"

#ifdef FS_KERNEL_HEADERS
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/signal_types.h>
#define FS_OFF_task_struct__tgid __builtin_offsetof(struct task_struct, tgid)
#define FS_OFF_task_struct__real_parent __builtin_offsetof(struct task_struct, real_parent)
#define FS_OFF_task_struct__group_leader __builtin_offsetof(struct task_struct, group_leader)
#define FS_OFF_task_struct__comm __builtin_offsetof(struct task_struct, comm)
#define FS_OFF_task_struct__start_boottime __builtin_offsetof(struct task_struct, start_boottime)
#define FS_OFF_task_struct__exit_code __builtin_offsetof(struct task_struct, exit_code)
#define FS_OFF_task_struct__signal __builtin_offsetof(struct task_struct, signal)
#define FS_OFF_signal_struct__live __builtin_offsetof(struct signal_struct, live)
#define FS_OFF_kernel_siginfo__si_code __builtin_offsetof(struct kernel_siginfo, si_code)
#endif

#define TRACE_SIGNAL_DELIVERED 0 /* include/trace/events/signal.h */
#define SI_USER 0
#define SI_KERNEL 0x80
#define SENDERS_MAX 4096 /* remembered senders at a time (LRU), exit_join.bpf.h */

/* maps created by the loader (as fatal_signals.bpf.c declares them): fatal_signals_events
 * (ring buffer), fatal_signals_stats (per-CPU struct stream_stats) */

/* Who generated the last fatal-kind signal queued for a process. */
struct sender {
	__u64 time_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 uid;
	__s32 code;
	__u32 sig;
	char comm[FATAL_SIGNALS_COMM_LEN];
};

/* target tgid -> the sender of its last fatal-kind signal; never deleted (as with libbpf,
 * where the process probe may read it after this): the LRU bounds it, the start time test
 * keeps an entry from a later process with the pid */
BPF_TABLE("lru_hash", __u32, struct sender, fatal_signals_senders, SENDERS_MAX);

/* signal_struct address -> reported (kernels whose sched_process_exit lacks group_dead) */
BPF_TABLE("lru_hash", __u64, __u8, fatal_signals_reported, 1024);

/* Whether a generated signal may be the one that kills: one of ours, and queued. */
FS_INLINE bool worth_remembering(int sig, int result)
{
	return sig > 0 && sig < 32 && (FATAL_SIGNALS_MASK & (1U << sig)) &&
	       result == TRACE_SIGNAL_DELIVERED;
}

/* Remember the sender (the current task) of a signal queued for process tgid. */
FS_INLINE int remember(int sig, int code, __u32 tgid)
{
	struct sender s = {};
	__u64 id;

	id = bpf_get_current_pid_tgid();
	s.time_ns = bpf_ktime_get_boot_ns();
	s.cgroup_id = bpf_get_current_cgroup_id();
	s.pid = id >> 32;
	s.uid = (__u32)bpf_get_current_uid_gid();
	s.code = code;
	s.sig = sig;
	bpf_get_current_comm(s.comm, sizeof(s.comm));
	fatal_signals_senders.update(&tgid, &s);
	return 0;
}

/* The exit of a thread; group_dead: it is the last of its thread group. */
FS_INLINE int handle_exit(bool group_dead)
{
	unsigned long task = bpf_get_current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct fatal_signals_event *e;
	struct sender *s;
	unsigned long parent = 0, leader = 0;
	__u64 start = 0;
	__u32 ppid = 0;
	int code = 0, sig;

	if (!group_dead)
		return 0;

	/* the group's exit code: the signal (| 0x80 with a core dump), or status << 8 */
	FS_READ(code, task, FS_OFF_task_struct__exit_code);
	sig = code & 0x7f;
	if (sig >= 32 || !(FATAL_SIGNALS_MASK & (1U << sig))) /* real-time signals kill too */
		return 0;
	if (!filter_pass())
		return 0;
	s = fatal_signals_senders.lookup(&tgid);

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(FS_MAP(fatal_signals_events), sizeof(*e), FS_MAP(fatal_signals_stats),
			   FATAL_SIGNALS_STREAM);
	if (!e)
		return 0;

	/* who died, of what */
	e->time_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = tgid;
	FS_READ(parent, task, FS_OFF_task_struct__real_parent);
	FS_READ(ppid, parent, FS_OFF_task_struct__tgid);
	e->ppid = ppid;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->signal = sig;
	e->flags = code & 0x80 ? FATAL_SIGNALS_CORE_DUMPED : 0;
	FS_READ(leader, task, FS_OFF_task_struct__group_leader);
	__builtin_memset(e->comm, 0, sizeof(e->comm));
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm),
				  (void *)(leader + FS_OFF_task_struct__comm));

	/* by whom, when the signal's generation was seen after this process started */
	FS_READ(start, leader, FS_OFF_task_struct__start_boottime);
	__builtin_memset(e->sender_comm, 0, sizeof(e->sender_comm));
	if (s && s->sig == sig && s->time_ns >= start) {
		e->flags |= FATAL_SIGNALS_SENDER_KNOWN;
		e->sender_pid = s->pid;
		e->sender_uid = s->uid;
		e->sender_cgroup_id = s->cgroup_id;
		e->code = s->code;
		e->delay_ns = e->time_ns - s->time_ns;
		__builtin_memcpy(e->sender_comm, s->comm, sizeof(e->sender_comm));
	} else {
		e->sender_pid = e->sender_uid = 0;
		e->sender_cgroup_id = e->delay_ns = 0;
		e->code = 0;
	}

	/* publish the record */
	stream_submit(FS_MAP(fatal_signals_events), e);
	return 0;
}

/* group_dead on kernels whose sched_process_exit lacks it: signal->live == 0, first to
 * insert the signal_struct reports */
FS_INLINE bool group_dead_by_live(void)
{
	unsigned long task = bpf_get_current_task(), signal = 0;
	__u64 key;
	__u8 one = 1;
	int live = 0;

	FS_READ(signal, task, FS_OFF_task_struct__signal);
	FS_READ(live, signal, FS_OFF_signal_struct__live);
	if (live != 0)
		return false;
	key = signal;
	return !fatal_signals_reported.insert(&key, &one);
}

#ifdef FS_TRACEPOINTS
int tp__signal__signal_generate(struct tracepoint__signal__signal_generate *args)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 target = args->pid; /* a thread id */

	if (!worth_remembering(args->sig, args->result))
		return 0;
	/* a signal a task sends itself is keyed by its own tgid; another task's by the target
	 * pid, the tgid for kill() */
	if (target == (__u32)id)
		target = id >> 32;
	return remember(args->sig, args->code, target);
}

int tp__sched__sched_process_exit(struct tracepoint__sched__sched_process_exit *args)
{
#ifdef FS_TP_sched__sched_process_exit__group_dead /* 6.16+ */
	return handle_exit(args->group_dead);
#else
	return handle_exit(group_dead_by_live());
#endif
}
#endif

/* TP_PROTO(int sig, struct kernel_siginfo *info, struct task_struct *task, int group,
 *	    int result) */
int raw_tp__signal_generate(struct bpf_raw_tracepoint_args *ctx)
{
	unsigned long info = ctx->args[1];
	int sig = (int)ctx->args[0], code = 0;
	__u32 tgid = 0;

	if (!worth_remembering(sig, (int)ctx->args[4]))
		return 0;
	/* what the tracepoint records as code: SEND_SIG_NOINFO is 0, SEND_SIG_PRIV is 1 */
	if (info == 0)
		code = SI_USER;
	else if (info == 1)
		code = SI_KERNEL;
	else
		FS_READ(code, info, FS_OFF_kernel_siginfo__si_code);
	FS_READ(tgid, ctx->args[2], FS_OFF_task_struct__tgid);
	return remember(sig, code, tgid);
}

/* 6.16+: TP_PROTO(struct task_struct *p, bool group_dead); reading the second argument makes
 * the attach fail on older kernels, where raw_tp__sched_process_exit_old takes over */
int raw_tp__sched_process_exit(struct bpf_raw_tracepoint_args *ctx)
{
	return handle_exit((bool)ctx->args[1]);
}

int raw_tp__sched_process_exit_old(struct bpf_raw_tracepoint_args *ctx)
{
	return handle_exit(group_dead_by_live());
}
