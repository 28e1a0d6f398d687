/* SPDX-License-Identifier: GPL-2.0 */
/* In-kernel log2 histograms for hot hooks: per-CPU hash maps of struct hist, in two
 * generations. Programs add to generation hist_gen; every interval the agent flips it,
 * waits until no program can still hold the old one (membarrier(MEMBARRIER_CMD_GLOBAL),
 * i.e. synchronize_rcu(): every BPF tracing program runs inside an RCU read section),
 * then reads and deletes the old generation in bulk. No count is lost between read and
 * reset. Include after common.bpf.h. */
#ifndef FLEETSCOPE_HISTOGRAM_BPF_H
#define FLEETSCOPE_HISTOGRAM_BPF_H

#include "histogram.h"

/* The generation programs write (0 or 1); written by the agent at run time, so not a
 * const knob. Its own section makes it its own map (".data.hist_gen"), which the agent
 * overwrites whole without touching other globals. */
volatile __u32 hist_gen SEC(".data.hist_gen") = 0;

/* zero value for inserting a key (read only) */
static const struct hist hist_zero;

/* Two generations of a histogram map keyed by key_type. Elements are allocated on first
 * use (no prealloc): memory follows the keys in use, at most max_entries (the loader sets
 * it from histogram_max_keys) x possible CPUs x sizeof(struct hist) per generation. */
#define HIST_MAPS(name, key_type)                                                      \
	struct {                                                                       \
		__uint(type, BPF_MAP_TYPE_PERCPU_HASH);                                \
		__uint(map_flags, BPF_F_NO_PREALLOC);                                  \
		__uint(max_entries, 4096);                                             \
		__type(key, key_type);                                                 \
		__type(value, struct hist);                                            \
	} name##_h0 SEC(".maps"), name##_h1 SEC(".maps")

/* floor(log2(v)) for v > 0, 0 for v == 0, without loops (as libbpf-tools' log2l) */
static __always_inline __u32 hist_log2(__u64 v)
{
	__u32 r = 0, shift;

	shift = (v > 0xFFFFFFFFULL) << 5;
	v >>= shift;
	r |= shift;
	shift = (v > 0xFFFF) << 4;
	v >>= shift;
	r |= shift;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= (v >> 1);
	return r;
}

/* The histogram of key in map, inserted zeroed on its first sample of the interval. A
 * concurrent insert of the same key on another CPU makes ours fail with EEXIST; the
 * second lookup finds theirs. NULL only when the map is full. */
static __always_inline struct hist *hist_get(void *map, const void *key)
{
	struct hist *h = bpf_map_lookup_elem(map, key);

	if (h)
		return h;
	bpf_map_update_elem(map, key, &hist_zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}

/* Add one sample of delta_ns under key to the current generation of name##_h0/_h1;
 * false when the map is full. The per-CPU values need no atomics: a program never nests
 * on its CPU (bpf_prog->active) and only one program of a probe adds samples. */
#define HIST_ADD(name, key, delta_ns)                                                  \
	({                                                                             \
		struct hist *__h = (hist_gen & 1) ? hist_get(&name##_h1, key)          \
						  : hist_get(&name##_h0, key);         \
		__u32 __slot = hist_log2(delta_ns);                                    \
		if (__h) {                                                             \
			__h->slots[__slot < HIST_SLOTS ? __slot : HIST_SLOTS - 1]++;  \
			__h->sum_ns += delta_ns;                                       \
		}                                                                      \
		__h != NULL;                                                           \
	})

/* Count one sample in stream's stats: emitted, and dropped unless it was recorded. So
 * for a histogram stream, emitted - dropped == the sum of the counts the agent reads.
 * Plain increments: for probes whose counting programs cannot interrupt each other. */
static __always_inline void hist_count(void *stats_map, __u32 stream, bool recorded)
{
	struct stream_stats *s = bpf_map_lookup_elem(stats_map, &stream);

	if (s) {
		s->emitted++;
		if (!recorded)
			s->dropped++;
	}
}

/* hist_count for probes whose counting programs can interrupt each other on a CPU (e.g.
 * a completion in hard irq context during one in soft irq context). */
static __always_inline void hist_count_atomic(void *stats_map, __u32 stream, bool recorded)
{
	struct stream_stats *s = bpf_map_lookup_elem(stats_map, &stream);

	if (s) {
		__sync_fetch_and_add(&s->emitted, 1);
		if (!recorded)
			__sync_fetch_and_add(&s->dropped, 1);
	}
}

#endif /* FLEETSCOPE_HISTOGRAM_BPF_H */
