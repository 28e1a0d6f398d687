/* SPDX-License-Identifier: GPL-2.0 */
/* Event record of the "file_open" probe, shared with user space. Python reads these
 * bytes through the object's BTF: fixed-width types, largest first, no hidden holes.
 * The includer provides __u16/__u32/__u64 (vmlinux.h in BPF, <linux/types.h> in user space). */
#ifndef FLEETSCOPE_FILE_OPEN_H
#define FLEETSCOPE_FILE_OPEN_H

#define FILE_OPEN_COMM_LEN 16
#define FILE_OPEN_PATH_LEN 256
#define FILE_OPEN_PREFIXES 8     /* at most this many capture prefixes */
#define FILE_OPEN_PREFIX_LEN 64  /* bytes per prefix (no NUL needed: lengths are kept) */

/* file_open_event.syscall */
enum file_open_syscall {
	FILE_OPEN_OPENAT = 0,
	FILE_OPEN_OPENAT2 = 1,
	FILE_OPEN_OPEN = 2,
	FILE_OPEN_CREAT = 3,
};

/* file_open_event.rflags */
#define FILE_OPEN_PATH_TRUNCATED (1U << 0) /* path longer than path[] */
#define FILE_OPEN_PATH_UNREADABLE (1U << 1) /* the user string could not be read */

/* Index into the file_open_stats per-CPU array (value: struct stream_stats). */
enum file_open_stream {
	FILE_OPEN_STREAM = 0,
	FILE_OPEN_STREAM_COUNT = 1,
};

/* One open that passed the capture rule (failed, under a prefix, or all opens). */
struct file_open_event {
	__u64 time_ns;   /* bpf_ktime_get_boot_ns() at syscall exit */
	__u64 cgroup_id; /* cgroup v2 id of the opener */
	__u32 pid;       /* tgid */
	__u32 tid;
	__u32 uid;
	__u32 flags;     /* open flags (O_*), as passed; openat2: how.flags */
	__u32 mode;      /* mode argument, as passed (meaningful with O_CREAT/O_TMPFILE) */
	__s32 ret;       /* the syscall's result: fd >= 0, or -errno */
	__s32 dfd;       /* directory fd of openat/openat2 (-100: AT_FDCWD); open/creat: -100 */
	__u16 syscall;   /* enum file_open_syscall */
	__u16 rflags;    /* FILE_OPEN_PATH_* */
	char comm[FILE_OPEN_COMM_LEN];
	char path[FILE_OPEN_PATH_LEN]; /* path as passed to the syscall, NUL terminated */
};

_Static_assert(sizeof(struct file_open_event) == 320, "file_open_event layout");

#endif /* FLEETSCOPE_FILE_OPEN_H */
