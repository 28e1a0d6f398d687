/* SPDX-License-Identifier: GPL-2.0 */
/* Event record of the "oom_kills" probe, shared with user space. Python reads these
 * bytes through the object's BTF: fixed-width types, largest first, no hidden holes.
 * The includer provides __s16/__u16/__u32/__u64 (vmlinux.h in BPF, <linux/types.h> in
 * user space). */
#ifndef FLEETSCOPE_OOM_KILLS_H
#define FLEETSCOPE_OOM_KILLS_H

#define OOM_KILLS_COMM_LEN 16

/* oom_kills_event.flags */
#define OOM_KILLS_NO_FIGURES (1U << 0) /* kernel before 6.8: the tracepoint has no memory figures */
/* the process probe runs with this probe's oom_victims map and the victim was stored there:
 * the victim's process_exit record carries this kill (exit_join.bpf.h) */
#define OOM_KILLS_IN_PROCESS_EXIT (1U << 1)

/* Index into the oom_kills_stats per-CPU array (value: struct stream_stats). */
enum oom_kills_stream {
	OOM_KILLS_STREAM = 0,
	OOM_KILLS_STREAM_COUNT = 1,
};

/* One task chosen and marked as an OOM victim (oom:mark_victim); the SIGKILL follows. */
struct oom_kills_event {
	__u64 time_ns;           /* bpf_ktime_get_boot_ns() */
	__u64 cgroup_id;         /* victim's cgroup v2 id; 0 when unknown (see oom_kills.bpf.c) */
	__u64 trigger_cgroup_id; /* cgroup v2 id of the task whose allocation ran out */
	__u64 total_vm_kb;       /* victim's memory figures at the kill, KiB, as in the kernel log */
	__u64 anon_rss_kb;
	__u64 file_rss_kb;
	__u64 shmem_rss_kb;
	__u64 pgtables_kb;
	__u32 pid;         /* victim tgid */
	__u32 uid;         /* victim's uid */
	__u32 trigger_pid; /* tgid of the task whose allocation ran out (the OOM killer's caller) */
	__s16 oom_score_adj;
	__u16 flags; /* OOM_KILLS_* */
	char comm[OOM_KILLS_COMM_LEN];
	char trigger_comm[OOM_KILLS_COMM_LEN];
};

_Static_assert(sizeof(struct oom_kills_event) == 112, "oom_kills_event layout");

#endif /* FLEETSCOPE_OOM_KILLS_H */
