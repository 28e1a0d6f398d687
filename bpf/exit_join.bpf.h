/* SPDX-License-Identifier: GPL-2.0 */
/* Maps through which the "process" probe's exit program reads what oom_kills and
 * fatal_signals saw of a process, so that its process_exit record carries the OOM kill and
 * the fatal signal's sender (the join happens on the node, in the kernel).
 *
 * oom_kills and fatal_signals own and fill them; the loader makes the process object reuse
 * them (bpf_map__reuse_fd) when those probes run, else the process object's own copies stay
 * empty. Every object declares them identically (reuse takes the owner's map as it is).
 *
 * Nothing deletes entries: several programs run on sched_process_exit, in an order that
 * differs between raw_tp and tracepoint attachments, and a leader thread may exit before or
 * after the last thread of its group, so no reader may depend on another having run.
 * LRU bounds the maps; each entry is tied to its process's start time, so an entry of an
 * earlier process whose pid was reused is never taken. Include after common.bpf.h, with
 * EXIT_JOIN_OOM_VICTIMS and/or EXIT_JOIN_SENDERS defined for the maps the object uses. */
#ifndef FLEETSCOPE_EXIT_JOIN_BPF_H
#define FLEETSCOPE_EXIT_JOIN_BPF_H

#define OOM_VICTIMS_MAX 1024         /* OOM victims between their kill and their exit (LRU) */
#define FATAL_SIGNALS_SENDERS_MAX 4096 /* processes with a remembered signal at a time (LRU) */

/* A process chosen by the OOM killer: exact, its start time is part of the key. */
struct oom_victim_key {
	__u64 start_ns; /* the thread group leader's start_boottime */
	__u32 tgid;
	__u32 pad;
};

/* The oom_kills record's figures, for the victim's process_exit record. */
struct oom_victim {
	__u64 time_ns; /* the oom_kills record's time_ns (oom:mark_victim) */
	__u64 total_vm_kb;
	__u64 anon_rss_kb;
	__u64 file_rss_kb;
	__u64 shmem_rss_kb;
	__u64 pgtables_kb;
	__u32 trigger_pid;
	__s16 oom_score_adj;
	__u16 pad;
};

#ifdef EXIT_JOIN_OOM_VICTIMS
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, OOM_VICTIMS_MAX);
	__type(key, struct oom_victim_key);
	__type(value, struct oom_victim);
} oom_victims SEC(".maps");
#endif

/* Who generated the last fatal-kind signal queued for a process (signal:signal_generate). */
struct fatal_signals_sender {
	__u64 time_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 uid;
	__s32 code;
	__u32 sig;
	char comm[16];
};

#ifdef EXIT_JOIN_SENDERS
/* Keyed by the target tgid: the classic tracepoint knows no start time, so a reader tests
 * time_ns against the process's start (a later process with the pid started after it). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FATAL_SIGNALS_SENDERS_MAX);
	__type(key, __u32);
	__type(value, struct fatal_signals_sender);
} fatal_signals_senders SEC(".maps");
#endif

_Static_assert(sizeof(struct oom_victim_key) == 16, "oom_victim_key layout");
_Static_assert(sizeof(struct oom_victim) == 56, "oom_victim layout");
_Static_assert(sizeof(struct fatal_signals_sender) == 48, "fatal_signals_sender layout");

#endif /* FLEETSCOPE_EXIT_JOIN_BPF_H */
