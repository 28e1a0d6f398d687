/* SPDX-License-Identifier: GPL-2.0 */
/* Event records of the "process" probe, shared with user space. Python reads these
 * bytes through the object's BTF: fixed-width types, largest first, no hidden holes.
 * The includer provides __u32/__u64 (vmlinux.h in BPF, <linux/types.h> in user space). */
#ifndef FLEETSCOPE_PROCESS_H
#define FLEETSCOPE_PROCESS_H

#define PROCESS_COMM_LEN 16
#define PROCESS_FILENAME_LEN 256
#define PROCESS_ARGS_MAX 1024 /* upper bound of the args_max knob */

/* process_exec_event.flags */
#define PROCESS_EXEC_ARGS_TRUNCATED (1U << 0)     /* argv longer than args_len */
#define PROCESS_EXEC_FILENAME_TRUNCATED (1U << 1) /* path longer than filename[] */

/* Index into the process_stats per-CPU array (value: struct stream_stats). */
enum process_stream {
	PROCESS_STREAM_EXEC = 0,
	PROCESS_STREAM_EXIT = 1,
	PROCESS_STREAM_COUNT = 2,
};

/* One successful execve(): the new image of process pid. */
struct process_exec_event {
	__u64 time_ns;   /* bpf_ktime_get_boot_ns() */
	__u64 cgroup_id; /* cgroup v2 id (inode number of the cgroup directory) */
	__u32 pid;       /* tgid */
	__u32 ppid;      /* real_parent->tgid */
	__u32 uid;
	__u32 args_len; /* bytes of argv in args[] */
	__u32 argc;     /* arguments seen in args[] (a cut-off last one counts) */
	__u32 flags;    /* PROCESS_EXEC_* */
	char comm[PROCESS_COMM_LEN];
	char filename[PROCESS_FILENAME_LEN]; /* path as passed to execve, NUL terminated */
	char args[PROCESS_ARGS_MAX];         /* argv strings, NUL separated, as in memory */
};

/* process_exit_event.flags */
#define PROCESS_EXIT_OOM_KILLED (1U << 0)    /* oom_kills saw the OOM killer choose it: oom_* filled */
#define PROCESS_EXIT_SENDER_KNOWN (1U << 1)  /* fatal_signals saw the signal's generation: signal_* filled */
#define PROCESS_EXIT_SIGNALS_JOINED (1U << 2) /* fatal_signals shares its senders map with this probe */

/* Exit of a thread-group leader, i.e. of a process. The oom_* and signal_sender_* fields
 * come from the maps oom_kills and fatal_signals share with this probe (exit_join.bpf.h);
 * zero when those probes do not run. */
struct process_exit_event {
	__u64 time_ns;         /* bpf_ktime_get_boot_ns() */
	__u64 cgroup_id;       /* cgroup v2 id */
	__u64 duration_ns;     /* time_ns - task->start_boottime */
	__u64 oom_delay_ns;    /* time_ns - the OOM kill (the oom_kills record's time_ns) */
	__u64 oom_total_vm_kb; /* the victim's memory figures at the kill, KiB (as oom_kills) */
	__u64 oom_anon_rss_kb;
	__u64 oom_file_rss_kb;
	__u64 oom_shmem_rss_kb;
	__u64 oom_pgtables_kb;
	__u64 signal_delay_ns; /* time_ns - the terminating signal's generation */
	__u32 pid;             /* tgid */
	__u32 ppid;            /* real_parent->tgid */
	__u32 exit_code;       /* exit status, (task->exit_code >> 8) & 0xff */
	__u32 signal;          /* terminating signal, task->exit_code & 0x7f; 0 if none */
	__u32 flags;           /* PROCESS_EXIT_* */
	__u32 oom_trigger_pid; /* tgid of the task whose allocation ran out */
	__u32 signal_sender_pid; /* tgid of the task current when the signal was generated */
	__u32 signal_sender_uid;
	__s32 signal_code; /* si_code of the signal */
	__s16 oom_score_adj;
	__u16 pad;
	char comm[PROCESS_COMM_LEN];
	char signal_sender_comm[PROCESS_COMM_LEN];
};

_Static_assert(sizeof(struct process_exec_event) == 1336, "process_exec_event layout");
_Static_assert(sizeof(struct process_exit_event) == 152, "process_exit_event layout");

#endif /* FLEETSCOPE_PROCESS_H */
