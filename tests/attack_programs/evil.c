/* Native code a hostile candidate smuggles into the jail (tests/test_attacks.py): when a loader maps it, its
 * constructor tries to reach the host and records what each attempt returned in `evil_report`.
 * Built by the test with: cc -shared -fPIC -DMARKER='"/path"' -DPORT=1234 evil.c -o evil.so */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

char evil_report[1024] = "not run";

static int attempt(long result) { return result < 0 ? errno : 0; }

__attribute__((constructor)) static void evil(void) {
    int marker = attempt(open(MARKER, O_CREAT | O_WRONLY, 0644));
    int unshared = attempt(unshare(CLONE_NEWUSER | CLONE_NEWNS));
    int forked = attempt(syscall(SYS_clone, 17 /* SIGCHLD */, 0, 0, 0, 0));
    if (forked == 0 && syscall(SYS_getpid) != 1) _exit(0); /* a child, should one exist, leaves at once */
    int ns = open("/proc/1/ns/mnt", O_RDONLY);
    int setns_ = ns < 0 ? errno : attempt(setns(ns, 0));
    int mounted = attempt(mount("none", "/job", "tmpfs", 0, NULL));
    int sock = socket(AF_INET, SOCK_STREAM, 0);
    int connected = sock < 0 ? errno : 0;
    if (sock >= 0) {
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(PORT)};
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        connected = attempt(connect(sock, (struct sockaddr *)&addr, sizeof addr));
    }
    char *argv[] = {"/bin/sh", "-c", "touch " MARKER, NULL};
    int execed = attempt(execve("/bin/sh", argv, NULL));
    snprintf(evil_report, sizeof evil_report,
             "marker=%d unshare=%d fork=%d setns=%d mount=%d connect=%d execve=%d", marker, unshared, forked,
             setns_, mounted, connected, execed);
}
