// SPDX-License-Identifier: GPL-2.0
/* "fatal_signals" probe: processes killed by SIGKILL, SIGSEGV, SIGBUS or SIGABRT, with the
 * sender of the signal when it was seen.
 *
 * A row is written when the last thread of a thread group exits (sched_process_exit with
 * group_dead) and the group's exit code is one of those signals: exactly one row per
 * process, whatever its threads did. signal:signal_deliver is not used: a SIGKILL, and
 * every thread but the first of a group dying of a signal, goes through get_signal()'s
 * "already marked for death" path, which traces a SIGKILL delivery with no siginfo, and
 * so does every other thread of a process that merely calls exit_group() or execve().
 *
 * signal:signal_generate (current = the sender) remembers, per target process, the last
 * of these signals actually queued (result TRACE_SIGNAL_DELIVERED); the exit of a process
 * killed by one of them looks it up. A fault (SIGSEGV, SIGBUS) or abort() names the process
 * itself as sender, with the fault's si_code; the OOM killer names the task whose allocation
 * ran out, with SI_KERNEL. The process probe's exit program reads the same map when the
 * loader made it share it (exit_join.bpf.h), so nothing here deletes an entry: the LRU
 * bounds the map and the start time test keeps an entry from a later process's pid. */
#include "common.bpf.h"
#include "fatal_signals.h"
#define EXIT_JOIN_SENDERS
#include "exit_join.bpf.h"

#define TRACE_SIGNAL_DELIVERED 0 /* include/trace/events/signal.h */
#define SI_USER 0
#define SI_KERNEL 0x80

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 16); /* default; the loader sets it before load */
} fatal_signals_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FATAL_SIGNALS_STREAM_COUNT);
	__type(key, __u32);
	__type(value, struct stream_stats);
} fatal_signals_stats SEC(".maps");

/* slot 0: 1 while the process probe runs with fatal_signals_senders shared (set by the
 * loader after it attached): its process_exit records carry the signals */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} fatal_signals_joined SEC(".maps");

/* Before 6.16 sched_process_exit has no group_dead: signal->live == 0 stands in for it,
 * which two threads exiting at once can both see; the first to insert its signal_struct
 * here reports the process. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64); /* struct signal_struct * */
	__type(value, __u8);
} fatal_signals_reported SEC(".maps");

/* keep the record type in the object's BTF: user space builds its dtype from it */
const struct fatal_signals_event *unused_fatal_signals_event __attribute__((unused));

/* Whether a generated signal may be the one that kills: one of ours, and queued (an
 * ignored signal, or one already pending, is not). Tested before anything is read. */
static __always_inline bool worth_remembering(int sig, int result)
{
	return sig > 0 && sig < 32 && (FATAL_SIGNALS_MASK & (1U << sig)) &&
	       result == TRACE_SIGNAL_DELIVERED;
}

/* Remember the sender (the current task) of a signal queued for process tgid. */
static __always_inline int remember(int sig, int code, __u32 tgid)
{
	struct fatal_signals_sender s = {};
	__u64 id;

	id = bpf_get_current_pid_tgid();
	s.time_ns = bpf_ktime_get_boot_ns();
	s.cgroup_id = bpf_get_current_cgroup_id();
	s.pid = id >> 32;
	s.uid = (__u32)bpf_get_current_uid_gid();
	s.code = code;
	s.sig = sig;
	bpf_get_current_comm(s.comm, sizeof(s.comm));
	bpf_map_update_elem(&fatal_signals_senders, &tgid, &s, BPF_ANY);
	return 0;
}

/* The exit of a thread; group_dead: it is the last of its thread group. */
static __always_inline int handle_exit(bool group_dead)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct fatal_signals_event *e;
	struct fatal_signals_sender *s;
	__u32 zero = 0, *joined;
	int code, sig;

	if (!group_dead)
		return 0;

	/* the group's exit code: the signal's number (| 0x80 if it dumped core), or
	 * status << 8 for a normal exit, which costs nothing more. A remembered sender stays
	 * in the LRU map (the process probe may read it after this); the start time test
	 * below keeps it from being taken for a later process with the same pid. */
	code = BPF_CORE_READ(task, exit_code);
	sig = code & 0x7f;
	if (sig >= 32 || !(FATAL_SIGNALS_MASK & (1U << sig))) /* real-time signals kill too */
		return 0;
	if (!filter_pass())
		return 0;
	s = bpf_map_lookup_elem(&fatal_signals_senders, &tgid);

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(&fatal_signals_events, sizeof(*e), &fatal_signals_stats,
			   FATAL_SIGNALS_STREAM);
	if (!e)
		return 0;

	/* who died, of what */
	e->time_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = tgid;
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->signal = sig;
	e->flags = code & 0x80 ? FATAL_SIGNALS_CORE_DUMPED : 0;
	/* the process probe's record of the leader's exit carries this signal when the leader
	 * died of it too (its exit_code is set before it leaves the group); one that exited on
	 * its own earlier (pthread_exit) reported another end: this row keeps the signal */
	joined = bpf_map_lookup_elem(&fatal_signals_joined, &zero);
	if (joined && *joined && (BPF_CORE_READ(task, group_leader, exit_code) & 0x7f) == sig)
		e->flags |= FATAL_SIGNALS_IN_PROCESS_EXIT;
	__builtin_memset(e->comm, 0, sizeof(e->comm));
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), BPF_CORE_READ(task, group_leader, comm));

	/* by whom, when the signal's generation was seen */
	__builtin_memset(e->sender_comm, 0, sizeof(e->sender_comm));
	if (s && s->sig == sig && s->time_ns >= BPF_CORE_READ(task, group_leader, start_boottime)) {
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
	stream_submit(&fatal_signals_events, e);
	return 0;
}

/* group_dead on kernels whose sched_process_exit lacks it (see fatal_signals_reported) */
static __always_inline bool group_dead_by_live(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct signal_struct *signal = BPF_CORE_READ(task, signal);
	__u64 key = (__u64)signal;
	__u8 one = 1;

	if (BPF_CORE_READ(signal, live.counter) != 0)
		return false;
	return !bpf_map_update_elem(&fatal_signals_reported, &key, &one, BPF_NOEXIST);
}

SEC("tracepoint/signal/signal_generate")
int tracepoint__signal__signal_generate(struct trace_event_raw_signal_generate *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 target = ctx->pid; /* a thread id */

	if (!worth_remembering(ctx->sig, ctx->result))
		return 0;
	/* a signal a task sends itself (fault, abort) is keyed by its own tgid; another
	 * task's is keyed by the target pid, the tgid for kill() (see docs: tgkill limits) */
	if (target == (__u32)id)
		target = id >> 32;
	return remember(ctx->sig, ctx->code, target);
}

SEC("raw_tp/signal_generate")
int BPF_PROG(raw_tp__signal_generate, int sig, struct kernel_siginfo *info,
	     struct task_struct *task, int group, int result)
{
	int code;

	if (!worth_remembering(sig, result))
		return 0;
	/* what the tracepoint records as code: SEND_SIG_NOINFO is 0, SEND_SIG_PRIV is 1 */
	if ((unsigned long)info == 0)
		code = SI_USER;
	else if ((unsigned long)info == 1)
		code = SI_KERNEL;
	else
		code = BPF_CORE_READ(info, si_code);
	return remember(sig, code, BPF_CORE_READ(task, tgid));
}

SEC("tracepoint/sched/sched_process_exit")
int tracepoint__sched__sched_process_exit(struct trace_event_raw_sched_process_exit *ctx)
{
	/* 6.16 added group_dead to the event */
	if (bpf_core_field_exists(ctx->group_dead))
		return handle_exit(ctx->group_dead);
	return handle_exit(group_dead_by_live());
}

/* 6.16+: (task, group_dead); reading the second argument makes the attach fail on older
 * kernels, where raw_tp__sched_process_exit_old takes over */
SEC("raw_tp/sched_process_exit")
int BPF_PROG(raw_tp__sched_process_exit, struct task_struct *p, bool group_dead)
{
	return handle_exit(group_dead);
}

SEC("raw_tp/sched_process_exit")
int raw_tp__sched_process_exit_old(void *ctx)
{
	return handle_exit(group_dead_by_live());
}

char LICENSE[] SEC("license") = "GPL";
