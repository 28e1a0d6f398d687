// SPDX-License-Identifier: GPL-2.0
/* "block_io_latency" probe: log2 histograms of block request latency, issue to
 * completion, per (disk, operation), aggregated in the kernel (histogram.bpf.h).
 *
 * block_rq_issue stores the time, disk and operation under the request; block_rq_complete
 * measures (the first completion of a partially completed request). tp_btf programs key
 * by the struct request pointer and are preferred; the classic tracepoint twins (for
 * loaders that only have those) have no pointer and key by (dev, sector) instead. Both
 * hooks are in the same tracefs directory, so both attach the same kind. Completions run
 * in irq context and are not the submitter's: the pid/cgroup filters do not apply. */
#include "common.bpf.h"
#include "histogram.bpf.h"
#include "block_io_latency.h"

#define START_MAX 16384 /* requests in flight at once, all disks */
#define MINORBITS 20    /* kernel dev_t: major << 20 | minor (include/linux/kdev_t.h) */

HIST_MAPS(block_io_latency, struct block_io_latency_key);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BLOCK_IO_LATENCY_STREAM_COUNT);
	__type(key, __u32);
	__type(value, struct stream_stats);
} block_io_latency_stats SEC(".maps");

/* a request in flight: {struct request *, 0} (tp_btf) or {dev, sector} (tracepoint) */
struct rq_id {
	__u64 a;
	__u64 b;
};

struct rq_start {
	__u64 ns;
	struct block_io_latency_key key;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, START_MAX);
	__type(key, struct rq_id);
	__type(value, struct rq_start);
} block_io_start SEC(".maps");

/* request_queue.disk replaced request.rq_disk in 5.16 */
struct request___old {
	struct gendisk *rq_disk;
} __attribute__((preserve_access_index));

const struct block_io_latency_key *unused_block_io_latency_key __attribute__((unused));
const struct hist *unused_hist __attribute__((unused));

static __always_inline int on_issue(const struct rq_id *id, __u32 dev, __u32 op)
{
	struct rq_start start = { .key = { .dev = dev, .op = op } };

	/* remember when the request went to the driver; a full map loses the sample, counted */
	start.ns = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&block_io_start, id, &start, BPF_ANY))
		hist_count_atomic(&block_io_latency_stats, BLOCK_IO_LATENCY_STREAM, false);
	return 0;
}

static __always_inline int on_complete(const struct rq_id *id)
{
	struct rq_start *start;
	__u64 delta;
	bool ok;

	/* issued since attach? (later partial completions of the request find nothing) */
	start = bpf_map_lookup_elem(&block_io_start, id);
	if (!start)
		return 0;
	delta = bpf_ktime_get_ns() - start->ns;

	/* add it to the (disk, operation) histogram, count it, forget the request */
	ok = HIST_ADD(block_io_latency, &start->key, delta);
	hist_count_atomic(&block_io_latency_stats, BLOCK_IO_LATENCY_STREAM, ok);
	bpf_map_delete_elem(&block_io_start, id);
	return 0;
}

/* REQ_OP_* (blk_opf_t & REQ_OP_MASK) -> enum block_io_op */
static __always_inline __u32 op_of_flags(__u32 cmd_flags)
{
	switch (cmd_flags & 0xff) { /* REQ_OP_MASK: REQ_OP_BITS = 8 */
	case REQ_OP_READ:
		return BLOCK_IO_READ;
	case REQ_OP_WRITE:
		return BLOCK_IO_WRITE;
	case REQ_OP_FLUSH:
		return BLOCK_IO_FLUSH;
	case REQ_OP_DISCARD:
	case REQ_OP_SECURE_ERASE:
		return BLOCK_IO_DISCARD;
	default:
		return BLOCK_IO_OTHER;
	}
}

/* rwbs of the tracepoint (blk_fill_rwbs), its first two letters: an optional 'F'
 * (preflush), then the operation letter R, W, D (discard, "DE" secure erase), F (flush)
 * or N (other), then flag letters. Passed as values: the verifier refuses loads through
 * a ctx pointer moved to the field. */
static __always_inline __u32 op_of_rwbs(char c, char next)
{
	if (c == 'F' && (next == 'R' || next == 'W' || next == 'D' || next == 'F' || next == 'N'))
		c = next;
	switch (c) {
	case 'R':
		return BLOCK_IO_READ;
	case 'W':
		return BLOCK_IO_WRITE;
	case 'D':
		return BLOCK_IO_DISCARD;
	case 'F':
		return BLOCK_IO_FLUSH;
	default:
		return BLOCK_IO_OTHER;
	}
}

/* the disk's dev_t, as the block tracepoints report it (tp_btf arguments are BTF
 * pointers: plain CO-RE relocated loads, no helper calls) */
static __always_inline __u32 dev_of_rq(struct request *rq)
{
	struct gendisk *disk;

	if (bpf_core_field_exists(rq->q->disk))
		disk = rq->q->disk;
	else
		disk = ((struct request___old *)rq)->rq_disk;
	if (!disk)
		return 0;
	return (disk->major << MINORBITS) | disk->first_minor;
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(tp_btf__block_rq_issue, struct request *rq)
{
	struct rq_id id = { .a = (__u64)rq };

	return on_issue(&id, dev_of_rq(rq), op_of_flags(rq->cmd_flags));
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(tp_btf__block_rq_complete, struct request *rq, int error, unsigned int nr_bytes)
{
	struct rq_id id = { .a = (__u64)rq };

	return on_complete(&id);
}

SEC("tracepoint/block/block_rq_issue")
int tracepoint__block__block_rq_issue(struct trace_event_raw_block_rq *ctx)
{
	struct rq_id id = { .a = ctx->dev, .b = ctx->sector };

	return on_issue(&id, ctx->dev, op_of_rwbs(ctx->rwbs[0], ctx->rwbs[1]));
}

SEC("tracepoint/block/block_rq_complete")
int tracepoint__block__block_rq_complete(struct trace_event_raw_block_rq_completion *ctx)
{
	struct rq_id id = { .a = ctx->dev, .b = ctx->sector };

	return on_complete(&id);
}

char LICENSE[] SEC("license") = "GPL";
