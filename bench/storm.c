// SPDX-License-Identifier: Apache-2.0
/* Storm generator for the agent benchmarks (bench/agent_cost.py, bench/bcc_peers.py,
 * bench/agent_memory.py): a C loop, so the generator spends as little CPU per event as
 * it can and leaves the rest of the machine to the agent being measured.
 *
 *   storm MODE SECONDS WORKERS RATE [ARG]
 *
 * MODE     exec      fork+exec ARG (a static binary that exits at once), argv "fsbench"
 *          tcp       loopback connect/accept/close (one connect and one accept row each)
 *          open      open(ARG, O_RDONLY) + close (ARG: a file on tmpfs)
 *          openfail  open(ARG) of a missing path (ENOENT), one syscall per event
 * WORKERS  processes running the loop in parallel
 * RATE     target operations/s over all workers, 0: as fast as possible
 *
 * Prints "<operations> <seconds>" when done. Built by bench/benchlib.py with cc -O2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	_exit(1);
}

struct tcp_state {
	int listener;
	struct sockaddr_in addr;
};

static void tcp_setup(struct tcp_state *t)
{
	int one = 1;
	socklen_t len = sizeof(t->addr);

	t->listener = socket(AF_INET, SOCK_STREAM, 0);
	if (t->listener < 0)
		die("socket");
	setsockopt(t->listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&t->addr, 0, sizeof(t->addr));
	t->addr.sin_family = AF_INET;
	t->addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(t->listener, (struct sockaddr *)&t->addr, sizeof(t->addr)) || listen(t->listener, 1024))
		die("bind/listen");
	getsockname(t->listener, (struct sockaddr *)&t->addr, &len);
}

static int op(const char *mode, const char *arg, struct tcp_state *t)
{
	if (!strcmp(mode, "exec")) {
		char *argv[] = {(char *)arg, "fsbench", NULL};
		char *envp[] = {NULL};
		pid_t pid = vfork();

		if (pid == 0) {
			execve(arg, argv, envp);
			_exit(127);
		}
		if (pid < 0)
			return -1;
		waitpid(pid, NULL, 0);
		return 0;
	}
	if (!strcmp(mode, "tcp")) {
		char buf[8];
		int c = socket(AF_INET, SOCK_STREAM, 0), s;

		if (c < 0)
			return -1;
		if (connect(c, (struct sockaddr *)&t->addr, sizeof(t->addr))) {
			close(c);
			return -1; /* e.g. EADDRNOTAVAIL when the ports run out: not counted */
		}
		s = accept(t->listener, NULL, NULL);
		if (write(c, "ping", 4) != 4 || (s >= 0 && read(s, buf, sizeof(buf)) < 0))
			; /* a payload so bytes_sent/received are not all zero */
		close(c);
		if (s >= 0)
			close(s);
		return 0;
	}
	if (!strcmp(mode, "open")) {
		int fd = open(arg, O_RDONLY);

		if (fd < 0)
			die("open");
		close(fd);
		return 0;
	}
	if (!strcmp(mode, "openfail")) {
		open(arg, O_RDONLY);
		return 0;
	}
	fprintf(stderr, "unknown mode %s\n", mode);
	_exit(2);
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: storm exec|tcp|open|openfail SECONDS WORKERS RATE [ARG]\n");
		return 2;
	}
	const char *mode = argv[1], *arg = argc > 5 ? argv[5] : "";
	double seconds = atof(argv[2]), rate = atof(argv[4]);
	int workers = atoi(argv[3]);
	/* one counter per worker in shared memory */
	long *counts = mmap(NULL, sizeof(long) * workers, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	double start = now();

	if (counts == MAP_FAILED)
		die("mmap");
	for (int w = 0; w < workers; w++) {
		pid_t pid = fork();

		if (pid < 0)
			die("fork");
		if (pid == 0) {
			struct tcp_state t;
			double per = rate / workers, t0 = now(), end = t0 + seconds;
			long n = 0;

			if (!strcmp(mode, "tcp"))
				tcp_setup(&t);
			for (;;) {
				/* check the clock every 64 operations: cheap, and paces in small steps */
				for (int i = 0; i < 64; i++)
					if (op(mode, arg, &t) == 0)
						n++;
				double tn = now();
				if (tn >= end)
					break;
				if (per > 0) {
					double ahead = n / per - (tn - t0);
					if (ahead > 0) {
						struct timespec ts = {(time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9)};
						nanosleep(&ts, NULL);
					}
				}
			}
			counts[w] = n;
			_exit(0);
		}
	}
	long total = 0;
	for (int w = 0; w < workers; w++)
		wait(NULL);
	for (int w = 0; w < workers; w++)
		total += counts[w];
	printf("%ld %.3f\n", total, now() - start);
	return 0;
}
