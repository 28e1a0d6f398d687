/* SPDX-License-Identifier: GPL-2.0 */
/* Histogram key of the "block_io_latency" probe, shared with user space (read via BTF).
 * The value is struct hist (histogram.h). The includer provides __u32. */
#ifndef FLEETSCOPE_BLOCK_IO_LATENCY_H
#define FLEETSCOPE_BLOCK_IO_LATENCY_H

/* Index into the block_io_latency_stats per-CPU array (value: struct stream_stats). */
enum block_io_latency_stream {
	BLOCK_IO_LATENCY_STREAM = 0,
	BLOCK_IO_LATENCY_STREAM_COUNT = 1,
};

/* block_io_latency_key.op */
enum block_io_op {
	BLOCK_IO_READ = 0,
	BLOCK_IO_WRITE = 1,
	BLOCK_IO_DISCARD = 2, /* discard and secure erase */
	BLOCK_IO_FLUSH = 3,
	BLOCK_IO_OTHER = 4, /* write zeroes, zone and driver operations */
};

/* One histogram per (disk, operation) and interval. */
struct block_io_latency_key {
	__u32 dev; /* the disk's dev_t as the kernel encodes it: major << 20 | minor */
	__u32 op;  /* enum block_io_op */
};

_Static_assert(sizeof(struct block_io_latency_key) == 8, "block_io_latency_key layout");

#endif /* FLEETSCOPE_BLOCK_IO_LATENCY_H */
