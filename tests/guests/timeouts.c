/* Huge timeouts: every call that takes a time gets tv_sec near LONG_MAX (or the largest
 * value its type holds), and invalid ones. The VMM must survive each and answer as Linux
 * does: EINVAL for an invalid time, else sleep "forever", which a 50 ms one-shot SIGALRM
 * (a handler without SA_RESTART) ends with EINTR. Raw syscalls, so that the kernel's own
 * answers are what a native run prints: the test compares the two outputs line by line. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

static void on_alarm(int sig) { (void)sig; }

static struct timespec started;

/* Arms a 50 ms one-shot alarm and notes the time. */
static void arm(void) {
    struct itimerval t = {{0, 0}, {0, 50000}};
    setitimer(ITIMER_REAL, &t, NULL);
    clock_gettime(CLOCK_MONOTONIC, &started);
}

static long elapsed_ms(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - started.tv_sec) * 1000 + (now.tv_nsec - started.tv_nsec) / 1000000;
}

/* How a call ended: its result, or its error and, for EINTR, whether it had waited for
 * the alarm. */
static void outcome(const char *what, long r, int e) {
    if (e == EINTR)
        printf("%s: EINTR%s\n", what, elapsed_ms() >= 40 ? " after the alarm" : " too soon");
    else if (e)
        printf("%s: %s\n", what, strerrorname_np(e));
    else
        printf("%s: %ld\n", what, r);
}

/* For a call that returns -1 and sets errno. */
static void report(const char *what, long r) { outcome(what, r, r == -1 ? errno : 0); }

/* For a call that returns its error number (clock_nanosleep). */
static void report_errno(const char *what, long r) { outcome(what, 0, (int)r); }

/* Linux saturates the absolute expiry at KTIME_MAX (292.27 years of uptime), so what is
 * left of a huge timeout is a little less than that. */
#define CENTURIES(sec) ((sec) >= 290L * 31557600L ? "yes" : "no")

#define HUGE_TS {LONG_MAX, 999999999}

int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    int p[2];
    pipe(p);
    struct pollfd pfd = {p[0], POLLIN, 0};
    fd_set set;

    /* nanosleep */
    struct timespec huge = HUGE_TS, rem = {0, 0};
    arm();
    report("nanosleep huge", syscall(SYS_nanosleep, &huge, &rem));
    printf("nanosleep huge: rem over 290 years: %s\n", CENTURIES(rem.tv_sec));
    struct timespec negative = {-1, 0}, nsec_over = {0, 1000000000}, nsec_negative = {LONG_MAX, -1};
    arm();
    report("nanosleep negative", syscall(SYS_nanosleep, &negative, NULL));
    report("nanosleep nsec=1e9", syscall(SYS_nanosleep, &nsec_over, NULL));
    report("nanosleep nsec=-1", syscall(SYS_nanosleep, &nsec_negative, NULL));

    /* clock_nanosleep: relative and absolute */
    arm();
    report_errno("clock_nanosleep huge", clock_nanosleep(CLOCK_MONOTONIC, 0, &huge, &rem));
    arm();
    report_errno("clock_nanosleep abstime huge",
                 clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &huge, NULL));
    arm();
    report_errno("clock_nanosleep negative", clock_nanosleep(CLOCK_MONOTONIC, 0, &negative, NULL));

    /* ppoll, pselect6, select, poll, epoll_wait on an empty pipe */
    arm();
    report("ppoll huge", syscall(SYS_ppoll, &pfd, 1, &huge, NULL, 8));
    arm();
    report("ppoll nsec=1e9", syscall(SYS_ppoll, &pfd, 1, &nsec_over, NULL, 8));
    FD_ZERO(&set);
    FD_SET(p[0], &set);
    arm();
    report("pselect6 huge", syscall(SYS_pselect6, p[0] + 1, &set, NULL, NULL, &huge, NULL));
    struct timeval tv = {LONG_MAX, 999999};
    FD_ZERO(&set);
    FD_SET(p[0], &set);
    arm();
    report("select huge", syscall(SYS_select, p[0] + 1, &set, NULL, NULL, &tv));
    struct timeval tv_usec_over = {0, 60000000}; /* 60 s, normalised by Linux */
    FD_ZERO(&set);
    FD_SET(p[0], &set);
    arm();
    report("select usec=6e7", syscall(SYS_select, p[0] + 1, &set, NULL, NULL, &tv_usec_over));
    struct timeval tv_overflow = {LONG_MAX, 1000000};
    arm();
    report("select sec overflow", syscall(SYS_select, p[0] + 1, &set, NULL, NULL, &tv_overflow));
    arm();
    report("select nfds=100000", syscall(SYS_select, 100000, NULL, NULL, NULL, &tv));
    arm();
    report("poll INT_MAX ms", syscall(SYS_poll, &pfd, 1, INT_MAX));
    int ep = epoll_create1(0);
    struct epoll_event ev = {EPOLLIN, {0}}, out[4];
    epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev);
    arm();
    report("epoll_wait INT_MAX ms", syscall(SYS_epoll_wait, ep, out, 4, INT_MAX));
    arm();
    report("epoll_wait 100000 events", syscall(SYS_epoll_wait, ep, out, 100000, -1));
    report("epoll_wait 0 events", syscall(SYS_epoll_wait, ep, out, 0, 0));

    /* setitimer, getitimer, alarm */
    struct itimerval far = {{LONG_MAX, 999999}, {LONG_MAX, 999999}}, now;
    report("setitimer huge", syscall(SYS_setitimer, ITIMER_REAL, &far, NULL));
    syscall(SYS_getitimer, ITIMER_REAL, &now);
    printf("getitimer: value over 290 years: %s, interval over 290 years: %s\n",
           CENTURIES(now.it_value.tv_sec), CENTURIES(now.it_interval.tv_sec));
    struct itimerval usec_over = {{0, 0}, {0, 1000000}}, off = {{0, 0}, {0, 0}};
    report("setitimer usec=1e6", syscall(SYS_setitimer, ITIMER_REAL, &usec_over, NULL));
    report("setitimer off", syscall(SYS_setitimer, ITIMER_REAL, &off, NULL));
    report("alarm UINT_MAX", syscall(SYS_alarm, UINT_MAX));
    long left = syscall(SYS_alarm, 0);
    printf("alarm 0: previous over 4294967290 s: %s\n", left >= 4294967290L ? "yes" : "no");

    /* timerfd */
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec its = {HUGE_TS, HUGE_TS}, got;
    report("timerfd_settime huge", syscall(SYS_timerfd_settime, tfd, 0, &its, NULL));
    syscall(SYS_timerfd_gettime, tfd, &got);
    printf("timerfd_gettime: value over 290 years: %s\n", CENTURIES(got.it_value.tv_sec));
    report("timerfd_settime abstime huge",
           syscall(SYS_timerfd_settime, tfd, TFD_TIMER_ABSTIME, &its, NULL));
    struct itimerspec bad = {{0, 0}, {0, 1000000000}};
    report("timerfd_settime nsec=1e9", syscall(SYS_timerfd_settime, tfd, 0, &bad, NULL));
    unsigned long long ticks;
    report("timerfd read", read(tfd, &ticks, sizeof ticks));
    printf("done\n");
    return 0;
}
