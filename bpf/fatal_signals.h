/* SPDX-License-Identifier: GPL-2.0 */
/* Event record of the "fatal_signals" probe, shared with user space. Python reads these
 * bytes through the object's BTF: fixed-width types, largest first, no hidden holes.
 * The includer provides __s32/__u32/__u64 (vmlinux.h in BPF, <linux/types.h> in user space). */
#ifndef FLEETSCOPE_FATAL_SIGNALS_H
#define FLEETSCOPE_FATAL_SIGNALS_H

#define FATAL_SIGNALS_COMM_LEN 16

/* The signals this probe reports: SIGABRT 6, SIGBUS 7, SIGKILL 9, SIGSEGV 11 (the same
 * numbers on x86 and arm64). */
#define FATAL_SIGNALS_MASK ((1U << 6) | (1U << 7) | (1U << 9) | (1U << 11))

/* fatal_signals_event.flags */
#define FATAL_SIGNALS_CORE_DUMPED (1U << 0)  /* a core dump was written */
#define FATAL_SIGNALS_SENDER_KNOWN (1U << 1) /* the sender fields are filled */
/* the process probe runs with this probe's senders map: the process's process_exit record
 * carries the signal and its sender (exit_join.bpf.h) */
#define FATAL_SIGNALS_IN_PROCESS_EXIT (1U << 2)

/* Index into the fatal_signals_stats per-CPU array (value: struct stream_stats). */
enum fatal_signals_stream {
	FATAL_SIGNALS_STREAM = 0,
	FATAL_SIGNALS_STREAM_COUNT = 1,
};

/* One process (thread group) that died of one of the signals in FATAL_SIGNALS_MASK. */
struct fatal_signals_event {
	__u64 time_ns;          /* bpf_ktime_get_boot_ns() at the exit of its last thread */
	__u64 cgroup_id;        /* cgroup v2 id of the process */
	__u64 sender_cgroup_id; /* of the task that generated the signal */
	__u64 delay_ns;         /* from the signal's generation to the process's end */
	__u32 pid;              /* tgid */
	__u32 ppid;
	__u32 uid;
	__u32 signal;     /* the terminating signal */
	__s32 code;       /* si_code of the signal: SI_USER 0, SI_KERNEL 128, SI_TKILL -6, faults > 0 */
	__u32 sender_pid; /* tgid of the task current when the signal was generated */
	__u32 sender_uid;
	__u32 flags;      /* FATAL_SIGNALS_* */
	char comm[FATAL_SIGNALS_COMM_LEN];        /* the process's (thread group leader's) comm */
	char sender_comm[FATAL_SIGNALS_COMM_LEN];
};

_Static_assert(sizeof(struct fatal_signals_event) == 96, "fatal_signals_event layout");

#endif /* FLEETSCOPE_FATAL_SIGNALS_H */
