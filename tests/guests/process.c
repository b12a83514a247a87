/* Process basics of a single-threaded program. */
#define _GNU_SOURCE
#include "check.h"
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <sys/time.h>
#include <sys/times.h>
#include <sys/xattr.h>
#include <fcntl.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static void handler(int sig) { (void)sig; }

int main(void) {
    CHECK(getpid() > 0 && getppid() > 0 && getpid() != getppid());
    CHECK(syscall(SYS_gettid) == getpid());
    CHECK(getuid() == geteuid() && getgid() == getegid());
    struct utsname u;
    CHECK(uname(&u) == 0 && !strcmp(u.sysname, "Linux") && !strcmp(u.machine, "x86_64"));

    struct timespec t0, t1, res;
    CHECK(clock_gettime(CLOCK_MONOTONIC, &t0) == 0);
    CHECK(clock_getres(CLOCK_MONOTONIC, &res) == 0);
    struct timespec nap = {0, 20 * 1000 * 1000};
    CHECK(nanosleep(&nap, NULL) == 0);
    CHECK(clock_nanosleep(CLOCK_MONOTONIC, 0, &nap, NULL) == 0);
    CHECK(clock_gettime(CLOCK_MONOTONIC, &t1) == 0);
    int64_t slept = (t1.tv_sec - t0.tv_sec) * 1000000000ll + (t1.tv_nsec - t0.tv_nsec);
    CHECK(slept >= 40 * 1000 * 1000 && slept < 2000ll * 1000 * 1000);
    struct timeval tv;
    CHECK(gettimeofday(&tv, NULL) == 0 && tv.tv_sec > 1700000000);
    CHECK(time(NULL) >= tv.tv_sec);
    CHECK(clock_gettime(999, &t0) == -1 && errno == EINVAL);

    /* Time answered in the doorbell agrees with time from the VMM (CLOCK_TAI takes the
     * exit path and reads the host's realtime clock), and never goes backwards. */
    struct timespec fast, slow;
    CHECK(clock_gettime(CLOCK_REALTIME, &fast) == 0);
    CHECK(syscall(SYS_clock_gettime, CLOCK_TAI, &slow) == 0);
    int64_t skew = (slow.tv_sec - fast.tv_sec) * 1000000000ll + (slow.tv_nsec - fast.tv_nsec);
    CHECK(skew > -1000 * 1000 && skew < 50 * 1000 * 1000); /* agree within a loaded machine's exit latency */
    struct timespec before, now;
    clock_gettime(CLOCK_MONOTONIC, &before);
    for (int i = 0; i < 100000; i++) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t step = (now.tv_sec - before.tv_sec) * 1000000000ll + (now.tv_nsec - before.tv_nsec);
        if (step < 0) { CHECK(step >= 0); break; }
        before = now;
    }
    /* The loop above may take more than a second on a slow host: read the host's clock
     * again right before comparing. */
    CHECK(syscall(SYS_clock_gettime, CLOCK_TAI, &slow) == 0);
    CHECK(gettimeofday(&tv, NULL) == 0 && tv.tv_sec - slow.tv_sec <= 1 && tv.tv_sec + 1 >= slow.tv_sec);
    time_t t_fast = time(NULL);
    CHECK(t_fast + 1 >= slow.tv_sec && t_fast - slow.tv_sec <= 1);
    CHECK(syscall(SYS_getpid) == getpid() && syscall(SYS_gettid) == getpid());
    CHECK(syscall(SYS_clock_gettime, CLOCK_MONOTONIC, (void *)8) == -1 && errno == EFAULT);

    unsigned char r1[32] = {0}, r2[32] = {0};
    CHECK(getrandom(r1, sizeof r1, 0) == sizeof r1 && getrandom(r2, sizeof r2, 0) == sizeof r2);
    CHECK(memcmp(r1, r2, sizeof r1) != 0);

    struct sigaction sa = {0}, old;
    sa.sa_handler = handler;
    CHECK(sigaction(SIGUSR1, &sa, NULL) == 0);
    CHECK(sigaction(SIGUSR1, NULL, &old) == 0 && old.sa_handler == handler);
    CHECK(sigaction(SIGKILL, &sa, NULL) == -1 && errno == EINVAL);
    sigset_t set, prev;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    CHECK(sigprocmask(SIG_BLOCK, &set, NULL) == 0);
    CHECK(sigprocmask(SIG_SETMASK, NULL, &prev) == 0 && sigismember(&prev, SIGUSR2));

    struct rlimit rl;
    CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur >= 256);
    CHECK(prlimit(0, RLIMIT_STACK, NULL, &rl) == 0 && rl.rlim_cur == 8 << 20);
    cpu_set_t cpus;
    CHECK(sched_getaffinity(0, sizeof cpus, &cpus) == 0 && CPU_COUNT(&cpus) >= 1 &&
          CPU_COUNT(&cpus) == sysconf(_SC_NPROCESSORS_ONLN));
    CHECK(sched_yield() == 0);
    struct sysinfo si;
    CHECK(sysinfo(&si) == 0 && si.totalram > 0 && si.mem_unit == 1);
    CHECK(syscall(SYS_set_robust_list, 0, 24) == 0);
    CHECK(syscall(100000) == -1 && errno == ENOSYS);
    /* Calls that gave ENOSYS: times, priorities, xattrs, close_range. */
    struct tms tms;
    CHECK(times(&tms) != (clock_t)-1);
    errno = 0;
    CHECK(getpriority(PRIO_PROCESS, 0) == 0 && errno == 0);
    CHECK(setpriority(PRIO_PROCESS, 0, 5) == 0);
    CHECK(getpriority(PRIO_PROCESS, 12345) == -1 && errno == ESRCH);
    char value[16];
    CHECK(getxattr("/", "user.x", value, sizeof value) == -1 && errno == ENOTSUP);
    CHECK(listxattr("/", value, sizeof value) == 0);
    CHECK(getxattr("/no/such", "user.x", value, sizeof value) == -1 && errno == ENOENT);
    int first = open("/dev/null", O_RDONLY), second = dup(first);
    CHECK(syscall(SYS_close_range, first, ~0U, 0) == 0);
    CHECK(close(second) == -1 && errno == EBADF);
    /* /dev/stdout, /dev/fd/N: another fd for the same file. */
    int out = open("/dev/stdout", O_WRONLY);
    CHECK(out > 2 && write(out, "", 0) == 0);
    int again = open("/dev/fd/1", O_WRONLY);
    CHECK(again > 2);
    CHECK(open("/dev/fd/999", O_RDONLY) == -1 && errno == ENOENT);
    /* A small /proc from the app's own figures. */
    char text[512] = {0};
    int proc = open("/proc/meminfo", O_RDONLY);
    CHECK(proc >= 0 && read(proc, text, sizeof text - 1) > 0 && !strncmp(text, "MemTotal:", 9));
    close(proc);
    unsigned long total_kib = 0;
    CHECK(sscanf(text, "MemTotal: %lu kB", &total_kib) == 1 && total_kib * 1024 <= si.totalram + 4096);
    proc = open("/proc/uptime", O_RDONLY);
    memset(text, 0, sizeof text);
    double up = -1;
    CHECK(proc >= 0 && read(proc, text, sizeof text - 1) > 0 && sscanf(text, "%lf", &up) == 1 && up >= 0);
    close(proc);
    proc = open("/proc/sys/kernel/pid_max", O_RDONLY);
    memset(text, 0, sizeof text);
    CHECK(proc >= 0 && read(proc, text, sizeof text - 1) > 0 && atoi(text) > getpid());
    close(proc);
    char cwd_link[256] = {0};
    CHECK(readlink("/proc/self/cwd", cwd_link, sizeof cwd_link - 1) > 0 && cwd_link[0] == '/');
    DONE();
}
