/* Processes: fork, vfork, posix_spawn, execve, wait4 and waitid, pipes between
 * processes, copy-on-write memory, SIGCHLD, process groups and kill across processes.
 * Run with no argument; it runs itself again (execve, posix_spawn) with one. */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static volatile sig_atomic_t chld;
static void on_chld(int sig) { (void)sig; chld++; }
static int counter = 1;

/* Sends fd `fd` over `sock` with one byte (SCM_RIGHTS). */
static int send_fd(int sock, int fd) {
    char byte = 'f';
    struct iovec iov = {&byte, 1};
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    return sendmsg(sock, &msg, 0) == 1 ? 0 : -1;
}

/* Receives one fd sent by send_fd, or -1. */
static int recv_fd(int sock) {
    char byte;
    struct iovec iov = {&byte, 1};
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != 1) return -1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof(int));
    return fd;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "exec-child")) {
        /* After execve: the fd the parent kept open without CLOEXEC is still here, the
         * CLOEXEC one is gone, and a handled signal is back to its default. */
        CHECK(fcntl(5, F_GETFD) == 0);
        CHECK(fcntl(6, F_GETFD) == -1 && errno == EBADF);
        struct sigaction sa;
        CHECK(sigaction(SIGUSR1, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL);
        CHECK(sigaction(SIGUSR2, NULL, &sa) == 0 && sa.sa_handler == SIG_IGN);
        /* /proc/self names the new program, its arguments and its parent. */
        char link[4096] = {0}, text[4096] = {0};
        CHECK(readlink("/proc/self/exe", link, sizeof link - 1) > 0 && !strcmp(link, argv[0]));
        int fd = open("/proc/self/cmdline", O_RDONLY);
        ssize_t got = read(fd, text, sizeof text - 1);
        close(fd);
        CHECK(got == (ssize_t)(strlen(argv[0]) + 1 + strlen("exec-child") + 1));
        CHECK(!strcmp(text, argv[0]) && !strcmp(text + strlen(argv[0]) + 1, "exec-child"));
        char expected[64];
        snprintf(expected, sizeof expected, "%d (", (int)getpid());
        fd = open("/proc/self/stat", O_RDONLY);
        memset(text, 0, sizeof text);
        CHECK(read(fd, text, sizeof text - 1) > 0 && !strncmp(text, expected, strlen(expected)));
        close(fd);
        char *after = strrchr(text, ')');
        int ppid = 0;
        CHECK(after && sscanf(after, ") %*c %d", &ppid) == 1 && ppid == getppid());
        CHECK(open("/proc/self/status", O_WRONLY) == -1 && errno == EACCES);
        CHECK(write(5, "exec", 4) == 4);
        return failures ? 1 : 42;
    }
    if (argc > 1 && !strcmp(argv[1], "spawned")) return 7;

    CHECK(wait(NULL) == -1 && errno == ECHILD);
    pid_t me = getpid();

    /* fork, exit status, getppid, copy-on-write both ways. */
    char *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    strcpy(shared, "parent");
    pid_t child = fork();
    if (child == 0) {
        int ok = getppid() == me && getpid() != me && !strcmp(shared, "parent") && counter == 1;
        strcpy(shared, "child");
        counter = 100;
        _exit(ok ? 7 : 1);
    }
    CHECK(child > 0 && child != me);
    counter = 2;
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 7);
    CHECK(!strcmp(shared, "parent") && counter == 2);
    CHECK(waitpid(child, &status, WNOHANG) == -1 && errno == ECHILD);

    /* A pipe between processes, and WNOHANG while the child still runs (it waits for
     * the parent's go on a second pipe). */
    int p[2], go[2];
    CHECK(pipe(p) == 0 && pipe(go) == 0);
    child = fork();
    if (child == 0) {
        close(p[0]);
        close(go[1]);
        char token;
        if (read(go[0], &token, 1) != 1) _exit(2);
        ssize_t n = write(p[1], "through a pipe", 14);
        _exit(n == 14 ? 0 : 1);
    }
    close(p[1]);
    close(go[0]);
    CHECK(waitpid(child, &status, WNOHANG) == 0);
    CHECK(write(go[1], "g", 1) == 1);
    close(go[1]);
    char buf[64] = {0};
    ssize_t got = 0, n;
    while ((n = read(p[0], buf + got, sizeof buf - 1 - got)) > 0) got += n;
    CHECK(got == 14 && !strcmp(buf, "through a pipe"));
    close(p[0]);
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);

    /* A child killed by a signal from its parent; SIGCHLD arrives. */
    struct sigaction sa = {0};
    sa.sa_handler = on_chld;
    /* Restarted, so that the waits below are not cut short by it (EINTR), as on Linux. */
    sa.sa_flags = SA_RESTART;
    CHECK(sigaction(SIGCHLD, &sa, NULL) == 0);
    child = fork();
    if (child == 0) {
        for (;;) pause();
    }
    usleep(50 * 1000);
    CHECK(kill(child, SIGTERM) == 0);
    siginfo_t info = {0};
    CHECK(waitid(P_PID, child, &info, WEXITED) == 0);
    CHECK(info.si_pid == child && info.si_code == CLD_KILLED && info.si_status == SIGTERM);
    for (int i = 0; i < 1000 && !chld; i++) usleep(10 * 1000);
    CHECK(chld >= 1);

    /* Process groups: a child leads its own; kill of the group reaches it. */
    child = fork();
    if (child == 0) {
        for (;;) pause();
    }
    CHECK(setpgid(child, child) == 0);
    CHECK(getpgid(child) == child && getpgid(0) == getpgrp() && getpgrp() != child);
    CHECK(kill(-child, SIGKILL) == 0);
    CHECK(waitpid(-child, &status, 0) == child && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    CHECK(kill(999999, 0) == -1 && errno == ESRCH);

    /* execve: the new program sees the fds without CLOEXEC and default handlers. */
    int e[2];
    CHECK(pipe(e) == 0);
    child = fork();
    if (child == 0) {
        dup2(e[1], 5);
        dup2(e[1], 6);
        fcntl(6, F_SETFD, FD_CLOEXEC);
        signal(SIGUSR1, on_chld);
        signal(SIGUSR2, SIG_IGN);
        char *args[] = {argv[0], "exec-child", NULL};
        execve(argv[0], args, environ);
        _exit(99);
    }
    close(e[1]);
    memset(buf, 0, sizeof buf);
    got = 0;
    while ((n = read(e[0], buf + got, sizeof buf - 1 - got)) > 0) got += n;
    CHECK(got == 4 && !strcmp(buf, "exec"));
    close(e[0]);
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 42);
    char *missing[] = {"/no/such/program", NULL};
    CHECK(execve("/no/such/program", missing, environ) == -1 && errno == ENOENT);

    /* vfork and posix_spawn (glibc: clone(CLONE_VM | CLONE_VFORK)). */
    child = vfork();
    if (child == 0) _exit(3);
    CHECK(child > 0 && waitpid(child, &status, 0) == child && WEXITSTATUS(status) == 3);
    char *spawn_args[] = {argv[0], "spawned", NULL};
    CHECK(posix_spawn(&child, argv[0], NULL, NULL, spawn_args, environ) == 0);
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 7);

    /* Several children, reaped in any order. */
    for (int i = 0; i < 5; i++) {
        if (fork() == 0) _exit(10 + i);
    }
    int seen = 0;
    for (int i = 0; i < 5; i++) {
        CHECK(wait(&status) > 0 && WIFEXITED(status));
        seen |= 1 << (WEXITSTATUS(status) - 10);
    }
    CHECK(seen == 0x1f);
    CHECK(wait(NULL) == -1 && errno == ECHILD);

    /* SCM_RIGHTS: the parent passes a pipe's write end to a child over a socketpair,
     * and the child writes through it; the received fd is a new one, close-on-exec. */
    int sv[2], q[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0 && pipe(q) == 0);
    child = fork();
    if (child == 0) {
        close(sv[0]);
        int fd = recv_fd(sv[1]);
        int ok = fd >= 0 && fcntl(fd, F_GETFD) == FD_CLOEXEC &&
                 write(fd, "passed", 6) == 6;
        _exit(ok ? 0 : 1);
    }
    close(sv[1]);
    CHECK(send_fd(sv[0], q[1]) == 0);
    close(q[1]);
    memset(buf, 0, sizeof buf);
    got = 0;
    while ((n = read(q[0], buf + got, sizeof buf - 1 - got)) > 0) got += n;
    CHECK(got == 6 && !strcmp(buf, "passed"));
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    close(q[0]);
    /* A socket on the app's private localhost is not passed: its peer filter is the
     * VMM's knowledge, which a receiver would not have. */
    int lo = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK(lo >= 0 && bind(lo, (struct sockaddr *)&local, sizeof local) == 0);
    CHECK(send_fd(sv[0], lo) == -1 && errno == EINVAL);
    close(lo);
    close(sv[0]);

    /* Children that ended but were not waited for keep their places, as zombies count
     * against RLIMIT_NPROC: forks stop with EAGAIN, and work again once they are reaped. */
    int zombies = 0;
    for (int i = 0; i < 200; i++) {
        pid_t z = fork();
        if (z == 0) _exit(0);
        if (z < 0) break;
        zombies++;
    }
    CHECK(zombies > 0 && zombies < 64 && errno == EAGAIN);
    while (wait(NULL) > 0) {}
    CHECK(errno == ECHILD);
    child = fork();
    if (child == 0) _exit(0);
    CHECK(child > 0 && waitpid(child, &status, 0) == child);

    /* With SIGCHLD ignored, children that end are reaped at once: more of them than the
     * app may have at a time are forked one after another (as a server forking per
     * connection does), retrying while the last ones are still ending. */
    signal(SIGCHLD, SIG_IGN);
    int forked = 0;
    for (int tries = 0; forked < 100 && tries < 5000; tries++) {
        pid_t kid = fork();
        if (kid == 0) _exit(0);
        if (kid > 0) forked++;
        else usleep(1000);
    }
    CHECK(forked == 100);
    signal(SIGCHLD, SIG_DFL);
    DONE();
}
