/* SPDX-License-Identifier: GPL-2.0 */
/* Value of the in-kernel latency histograms (syscall_latency, block_io_latency,
 * runqueue_latency), shared with user space, which reads it through BTF.
 * The includer provides __u64 (vmlinux.h in BPF, <linux/types.h> in user space). */
#ifndef FLEETSCOPE_HISTOGRAM_H
#define FLEETSCOPE_HISTOGRAM_H

#define HIST_SLOTS 32

/* One log2 histogram of nanoseconds, per CPU (the agent sums the CPUs): slots[i] counts
 * values in [2^i, 2^(i+1)) ns; slot 0 also holds 0, the last slot everything from
 * 2^(HIST_SLOTS-1) ns (2.1 s) up. The count is the sum of the slots. */
struct hist {
	__u64 slots[HIST_SLOTS];
	__u64 sum_ns;
};

_Static_assert(sizeof(struct hist) == 264, "hist layout");

#endif /* FLEETSCOPE_HISTOGRAM_H */
