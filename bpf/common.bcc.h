/* SPDX-License-Identifier: GPL-2.0 */
/* bcc counterpart of common.bpf.h for the bcc fallback loader (node_agent/bcc_loader.py):
 * the same per-CPU stream counters, ring-buffer wakeup policy and pid/cgroup filters.
 * The loader creates the maps itself (the same ring and stats maps as with libbpf) and
 * bcc only compiles and loads the programs. bcc compiles at load time, so the knobs that
 * libbpf writes into .rodata arrive as -D macros of the same names (wakeup_bytes,
 * targ_tgid, filter_cgroup, and each probe's own). Kernel struct fields are read at
 * offsets FS_OFF_<struct>__<field>, given by the loader from the kernel's BTF or, on a
 * kernel without BTF, defined by the probe from the kernel's own headers. */
#ifndef FLEETSCOPE_COMMON_BCC_H
#define FLEETSCOPE_COMMON_BCC_H

#ifndef wakeup_bytes
#define wakeup_bytes 0
#endif
#ifndef targ_tgid
#define targ_tgid 0
#endif
#ifndef filter_cgroup
#define filter_cgroup 0
#endif

#define FS_INLINE static inline __attribute__((always_inline))

/* The map the loader created for name: it passes each map's fd as -DFS_FD_<name>, and
 * bpf_pseudo_fd turns it into the map reference the kernel resolves at load (what bcc's
 * own map methods compile to, usable here in helpers shared by every stream). */
#define FS_MAP(name) ((void *)bpf_pseudo_fd(1, FS_FD_##name))

/* Read a kernel value of dst's size at address base + off; 0 when the read faults. */
#define FS_READ(dst, base, off) \
	bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)((unsigned long)(base) + (off)))

/* same layout as in common.bpf.h: the value of every probe's per-CPU stats map */
struct stream_stats {
	__u64 emitted; /* records the probe produced (reservation attempts) */
	__u64 dropped; /* of those, bpf_ringbuf_reserve failures (ring full) */
};

/* Whether the current task passes the configured filters (cgroup_filter slot 0: the
 * filter_cgroup directory). */
FS_INLINE bool filter_pass(void)
{
	if (targ_tgid && (bpf_get_current_pid_tgid() >> 32) != targ_tgid)
		return false;
	/* 1: under the cgroup, 0: not, <0: no cgroup in the map */
	if (filter_cgroup && bpf_current_task_under_cgroup(FS_MAP(cgroup_filter), 0) != 1)
		return false;
	return true;
}

/* Reserve a fixed-size record and count it, as a drop too when the ring is full. */
FS_INLINE void *stream_reserve(void *rb, __u64 size, void *stats_map, __u32 stream)
{
	struct stream_stats *s = bpf_map_lookup_elem(stats_map, &stream);
	void *rec = bpf_ringbuf_reserve(rb, size, 0);

	if (s) {
		s->emitted++;
		if (!rec)
			s->dropped++;
	}
	return rec;
}

/* Submit a record with the wakeup policy: force a wakeup once wakeup_bytes are pending
 * (the query counts reserved records, this one included), otherwise none. */
FS_INLINE void stream_submit(void *rb, void *rec)
{
	__u64 flags = 0;

	if (wakeup_bytes) {
		if (bpf_ringbuf_query(rb, BPF_RB_AVAIL_DATA) >= wakeup_bytes)
			flags = BPF_RB_FORCE_WAKEUP;
		else
			flags = BPF_RB_NO_WAKEUP;
	}
	bpf_ringbuf_submit(rec, flags);
}

#endif /* FLEETSCOPE_COMMON_BCC_H */
