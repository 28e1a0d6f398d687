// SPDX-License-Identifier: GPL-2.0
/* "process" probe: exec and exit of processes from the sched tracepoints.
 *
 * The logic (handle_exec, handle_exit) reads only the current task, so each hook has two
 * thin entry points: the classic tracepoint (preferred; bcc can compile the same logic)
 * and raw_tp, which attaches by name without tracefs. The loader attaches the first one
 * that works per hook. */
#include "common.bpf.h"
#include "process.h"
#include "fatal_signals.h" /* FATAL_SIGNALS_MASK */
#define EXIT_JOIN_OOM_VICTIMS
#define EXIT_JOIN_SENDERS
#include "exit_join.bpf.h"

#define SIGKILL 9

/* knobs, written into .rodata by the loader before load */
const volatile __u32 args_max = 512; /* bytes of argv to copy, clamped to PROCESS_ARGS_MAX */
/* set by the loader when this object reuses oom_kills' oom_victims / fatal_signals'
 * fatal_signals_senders (exit_join.bpf.h); otherwise those lookups are skipped */
const volatile __u32 oom_victims_shared = 0;
const volatile __u32 senders_shared = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* default; the loader sets it before load */
} process_exec_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18);
} process_exit_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PROCESS_STREAM_COUNT);
	__type(key, __u32);
	__type(value, struct stream_stats);
} process_stats SEC(".maps");

/* keep both record types in the object's BTF: user space builds its dtypes from it */
const struct process_exec_event *unused_process_exec_event __attribute__((unused));
const struct process_exit_event *unused_process_exit_event __attribute__((unused));

static __always_inline int handle_exec(const char *filename)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct process_exec_event *e;
	unsigned long arg_start, arg_end, len;
	__u32 n, i, argc = 0;
	char c = 0;
	long ret;

	/* the configured pid / cgroup filters */
	if (!filter_pass())
		return 0;

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(&process_exec_events, sizeof(*e), &process_stats,
			   PROCESS_STREAM_EXEC);
	if (!e)
		return 0;

	/* who and where */
	e->time_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = tgid;
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->flags = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));

	/* reserved memory is not zeroed: clear each string field before filling it so its
	 * tail is NULs, not an older record (clang 14 inlines memset up to 1024 bytes, and
	 * merges adjacent ones, so each field is cleared right before its own helper call) */
	__builtin_memset(e->filename, 0, sizeof(e->filename));

	/* filename as passed to execve; a full buffer whose source goes on is truncated */
	ret = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), filename);
	if (ret == sizeof(e->filename) &&
	    !bpf_probe_read_kernel(&c, 1, filename + sizeof(e->filename) - 1) && c)
		e->flags |= PROCESS_EXEC_FILENAME_TRUNCATED;

	/* argv strings of the new image: mm->arg_start..arg_end, NUL separated */
	arg_start = BPF_CORE_READ(task, mm, arg_start);
	arg_end = BPF_CORE_READ(task, mm, arg_end);
	len = arg_end > arg_start ? arg_end - arg_start : 0;
	n = len < args_max ? len : args_max;
	if (n > PROCESS_ARGS_MAX)
		n = PROCESS_ARGS_MAX;
	__builtin_memset(e->args, 0, sizeof(e->args));
	if (n && bpf_probe_read_user(e->args, n, (const void *)arg_start))
		n = 0;
	e->args_len = n;
	if (len > n)
		e->flags |= PROCESS_EXEC_ARGS_TRUNCATED;

	/* count the arguments in the copy: one per NUL, plus a cut-off last one */
	for (i = 0; i < PROCESS_ARGS_MAX; i++) {
		if (i >= n)
			break;
		c = e->args[i];
		if (!c)
			argc++;
	}
	if (n && c)
		argc++;
	e->argc = argc;

	/* publish the record */
	stream_submit(&process_exec_events, e);
	return 0;
}

static __always_inline int handle_exit(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	struct task_struct *exec_task = NULL;
	struct process_exit_event *e;
	struct fatal_signals_sender *s;
	struct oom_victim *v;
	__u64 start;
	int code;

	/* a process ends with its thread-group leader; other threads' exits are skipped */
	if (tgid != (__u32)id)
		return 0;

	/* the configured pid / cgroup filters */
	if (!filter_pass())
		return 0;

	/* an old leader killed by another thread's execve (de_thread) is no process exit;
	 * signal_struct.group_exec_task exists since 5.16 */
	if (bpf_core_field_exists(task->signal->group_exec_task))
		exec_task = BPF_CORE_READ(task, signal, group_exec_task);
	if (exec_task && exec_task != task)
		return 0;

	/* reserve a record in the ring buffer, counted (a full ring counts a drop) */
	e = stream_reserve(&process_exit_events, sizeof(*e), &process_stats,
			   PROCESS_STREAM_EXIT);
	if (!e)
		return 0;

	/* who, when and for how long (both clocks are boot time, ns) */
	start = BPF_CORE_READ(task, start_boottime);
	e->time_ns = bpf_ktime_get_boot_ns();
	e->duration_ns = e->time_ns - start;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = tgid;
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	bpf_get_current_comm(e->comm, sizeof(e->comm));

	/* do_exit stored the wait status before this tracepoint: code << 8 or signal */
	code = BPF_CORE_READ(task, exit_code);
	e->exit_code = (code >> 8) & 0xff;
	e->signal = code & 0x7f;

	/* reserved memory is not zeroed: every joined field starts at zero */
	e->flags = senders_shared ? PROCESS_EXIT_SIGNALS_JOINED : 0;
	e->oom_delay_ns = e->oom_total_vm_kb = e->oom_anon_rss_kb = e->oom_file_rss_kb = 0;
	e->oom_shmem_rss_kb = e->oom_pgtables_kb = e->signal_delay_ns = 0;
	e->oom_trigger_pid = e->signal_sender_pid = e->signal_sender_uid = 0;
	e->signal_code = 0;
	e->oom_score_adj = 0;
	e->pad = 0;
	__builtin_memset(e->signal_sender_comm, 0, sizeof(e->signal_sender_comm));

	/* an OOM victim dies of SIGKILL: the figures oom_kills recorded at the kill */
	if (oom_victims_shared && e->signal == SIGKILL) {
		struct oom_victim_key key = { .start_ns = start, .tgid = tgid };

		v = bpf_map_lookup_elem(&oom_victims, &key);
		if (v) {
			e->flags |= PROCESS_EXIT_OOM_KILLED;
			e->oom_delay_ns = e->time_ns - v->time_ns;
			e->oom_total_vm_kb = v->total_vm_kb;
			e->oom_anon_rss_kb = v->anon_rss_kb;
			e->oom_file_rss_kb = v->file_rss_kb;
			e->oom_shmem_rss_kb = v->shmem_rss_kb;
			e->oom_pgtables_kb = v->pgtables_kb;
			e->oom_trigger_pid = v->trigger_pid;
			e->oom_score_adj = v->oom_score_adj;
		}
	}

	/* the sender of a fatal signal, as fatal_signals remembered it for this process (an
	 * entry older than the process belongs to an earlier one with the same pid) */
	if (senders_shared && e->signal < 32 && (FATAL_SIGNALS_MASK & (1U << e->signal))) {
		s = bpf_map_lookup_elem(&fatal_signals_senders, &tgid);
		if (s && s->sig == e->signal && s->time_ns >= start) {
			e->flags |= PROCESS_EXIT_SENDER_KNOWN;
			e->signal_delay_ns = e->time_ns - s->time_ns;
			e->signal_sender_pid = s->pid;
			e->signal_sender_uid = s->uid;
			e->signal_code = s->code;
			__builtin_memcpy(e->signal_sender_comm, s->comm, sizeof(e->signal_sender_comm));
		}
	}

	/* publish the record */
	stream_submit(&process_exit_events, e);
	return 0;
}

SEC("tracepoint/sched/sched_process_exec")
int tracepoint__sched__sched_process_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	/* __data_loc: the low 16 bits are the string's offset from the record start */
	return handle_exec((const char *)ctx + (ctx->__data_loc_filename & 0xFFFF));
}

SEC("tracepoint/sched/sched_process_exit")
int tracepoint__sched__sched_process_exit(void *ctx)
{
	return handle_exit();
}

SEC("raw_tp/sched_process_exec")
int BPF_PROG(raw_tp__sched_process_exec, struct task_struct *p, pid_t old_pid,
	     struct linux_binprm *bprm)
{
	return handle_exec(BPF_CORE_READ(bprm, filename));
}

SEC("raw_tp/sched_process_exit")
int raw_tp__sched_process_exit(void *ctx)
{
	return handle_exit();
}

char LICENSE[] SEC("license") = "GPL";
