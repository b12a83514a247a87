/* A signal storm: a 100 us interval timer (SIGALRM, SA_RESTART) interrupts the app while it
 * makes calls of every path (answered in the doorbell, through the mailbox, with an exit,
 * blocking), and the handler makes calls too. Every result is checked, every syscall also
 * checks the registers Linux preserves across it, and every signal frame must hold the app's
 * own context: a user RIP, never one inside the VMM's doorbell.
 *
 * Usage: storm [SECONDS [PERIOD_US]] (default 2 s, 100 us). Prints "ready" first, and PASSED
 * with the counts. */
#define _GNU_SOURCE
#include "check.h"
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/utsname.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define USER_END 0x7ffffffff000UL

static volatile long handled, bad_rip, at_syscall, after_syscall, handler_wrong;
static long clobbered;
static long pid, ppid, uid;
static int feed[2];

/* syscall(nr, a, b, c) with the other argument registers and the callee-saved ones set to
 * known values, checked after: Linux keeps every register but RAX, RCX and R11. */
static long sys3(long nr, long a, long b, long c) {
    long rax = nr, rdi = a, rsi = b, rdx = c;
    register long r10 __asm__("r10") = 0x1010101010L;
    register long r8 __asm__("r8") = 0x0808080808L;
    register long r9 __asm__("r9") = 0x0909090909L;
    register long r12 __asm__("r12") = 0x1212121212L;
    register long r13 __asm__("r13") = 0x1313131313L;
    register long r14 __asm__("r14") = 0x1414141414L;
    register long r15 __asm__("r15") = 0x1515151515L;
    long rbx = 0xbbbbbbbbbbL;
    __asm__ volatile("syscall"
                     : "+a"(rax), "+D"(rdi), "+S"(rsi), "+d"(rdx), "+r"(r10), "+r"(r8),
                       "+r"(r9), "+r"(r12), "+r"(r13), "+r"(r14), "+r"(r15), "+b"(rbx)
                     :
                     : "rcx", "r11", "memory");
    if (rdi != a || rsi != b || rdx != c || r10 != 0x1010101010L || r8 != 0x0808080808L ||
        r9 != 0x0909090909L || r12 != 0x1212121212L || r13 != 0x1313131313L ||
        r14 != 0x1414141414L || r15 != 0x1515151515L || rbx != 0xbbbbbbbbbbL)
        clobbered++;
    return rax;
}

static int is_syscall(unsigned long at) {
    const unsigned char *p = (const unsigned char *)at;
    return p[0] == 0x0f && p[1] == 0x05;
}

static long ns(struct timespec t) { return t.tv_sec * 1000000000L + t.tv_nsec; }

static long start_ns, deadline_ns;
static volatile long ended_ns;

static void on_alarm(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    (void)si;
    ucontext_t *uc = ctx;
    unsigned long rip = uc->uc_mcontext.gregs[REG_RIP];
    handled++;
    if (rip < 0x1000 || rip >= USER_END) {
        bad_rip++;
        return;
    }
    if (is_syscall(rip))
        at_syscall++; /* stopped before its call: rewound, or never made it */
    else if ((rip & 0xfff) >= 2 && is_syscall(rip - 2))
        after_syscall++; /* its call returned */
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) handler_wrong++;
    /* The clock the doorbell answers stays sane here too (an hour is far beyond the test). */
    if (ns(ts) < start_ns || ns(ts) - start_ns > 3600000000000L) handler_wrong++;
    if (ns(ts) > deadline_ns) {
        /* The storm ends here, even if the app had no time left for its own work: a
         * handler slower than the timer's period starves the app, on Linux too. The
         * bytes let a reader waiting for the feed go on. */
        struct itimerval off = {{0, 0}, {0, 0}};
        if (setitimer(ITIMER_REAL, &off, NULL) != 0 || write(feed[1], "ff", 2) != 2)
            handler_wrong++;
        if (!ended_ns) ended_ns = ns(ts);
        return;
    }
    /* Calls from the handler itself, of the other kinds, now and then: every exit costs
     * tens of microseconds on kvm_pvm, and the app must keep some of each period. */
    if (handled % 4 == 0 && (syscall(SYS_getpid) != pid || syscall(SYS_getppid) != ppid))
        handler_wrong++;
    /* Feed the blocking reader. */
    if (handled % 16 == 0 && write(feed[1], "f", 1) != 1) handler_wrong++;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 2;
    long period_us = argc > 2 ? atol(argv[2]) : 100;
    pid = getpid();
    ppid = getppid();
    uid = getuid();
    int echo[2];
    /* A page that is never mapped: PROT_NONE, for the calls told to write there. */
    char *unmapped = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(unmapped != MAP_FAILED);
    CHECK(pipe(feed) == 0 && pipe(echo) == 0);

    struct sigaction sa = {0};
    sa.sa_sigaction = on_alarm;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    CHECK(sigaction(SIGALRM, &sa, NULL) == 0);
    struct timespec start, now, last;
    CHECK(sys3(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&start, 0) == 0);
    last = start;
    start_ns = ns(start);
    deadline_ns = start_ns + (long)(seconds * 1e9);
    printf("ready\n");
    fflush(stdout);
    struct itimerval storm = {{0, period_us}, {0, period_us}};
    CHECK(setitimer(ITIMER_REAL, &storm, NULL) == 0);
    long iterations = 0, sleeps = 0, fed = 0, wrong = 0;
    /* Which check went wrong first, and what it saw, for the report. */
    int wrong_line = 0;
    long wrong_value = 0;
#define WRONG(value) do { if (!wrong++) { wrong_line = __LINE__; wrong_value = (long)(value); } } while (0)
    for (;;) {
        iterations++;
        /* Answered in the doorbell. */
        if (sys3(SYS_getpid, 0, 0, 0) != pid || sys3(SYS_gettid, 0, 0, 0) != pid) WRONG(0);
        if (sys3(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&now, 0) != 0) WRONG(0);
        if (ns(now) < ns(last)) WRONG(ns(last) - ns(now));
        last = now;
        struct timeval tv;
        if (sys3(SYS_gettimeofday, (long)&tv, 0, 0) != 0 || tv.tv_sec < 1600000000) WRONG(0);
        /* Linux's time() reads a coarse clock, up to a tick behind gettimeofday. */
        long t = sys3(SYS_time, 0, 0, 0);
        if (t < tv.tv_sec - 1 || t > tv.tv_sec + 2) WRONG(t - tv.tv_sec);
        /* Answered in the doorbell, whose store to a bad pointer faults: EFAULT, whatever
         * signal comes between the fault and its delivery. */
        if (sys3(SYS_time, (long)unmapped, 0, 0) != -EFAULT) WRONG(0);
        if (sys3(SYS_gettimeofday, (long)unmapped, 0, 0) != -EFAULT) WRONG(0);
        /* Through the mailbox while its poller is awake. */
        if (sys3(SYS_getppid, 0, 0, 0) != ppid || sys3(SYS_getuid, 0, 0, 0) != uid) WRONG(0);
        char in[2] = {0};
        if (sys3(SYS_write, echo[1], (long)"ok", 2) != 2) WRONG(0);
        if (sys3(SYS_read, echo[0], (long)in, 2) != 2 || in[0] != 'o' || in[1] != 'k') WRONG(0);
        struct utsname u;
        if (sys3(SYS_uname, (long)&u, 0, 0) != 0) WRONG(0);
        /* Always with an exit. */
        struct itimerval it;
        if (sys3(SYS_getitimer, ITIMER_REAL, (long)&it, 0) != 0) WRONG(0);
        if (sys3(SYS_brk, 0, 0, 0) <= 0) WRONG(0);
        char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (page == MAP_FAILED) {
            WRONG(0);
        } else {
            page[100] = 7;
            if (page[100] != 7 || munmap(page, 4096) != 0) WRONG(0);
        }
        sigset_t old;
        if (sigprocmask(SIG_BLOCK, NULL, &old) != 0 || sigismember(&old, SIGALRM)) WRONG(0);
        /* Blocking: a short sleep (EINTR is its answer to a handler), and a read that waits
         * for what the handler feeds (restarted: SA_RESTART). */
        if (iterations % 8 == 1) {
            struct timespec nap = {0, 200000}, left;
            long r;
            while ((r = sys3(SYS_nanosleep, (long)&nap, (long)&left, 0)) == -EINTR) nap = left;
            if (r != 0) WRONG(r);
            sleeps++;
        }
        if (iterations % 8 == 5 && !ended_ns) {
            char f;
            long r = sys3(SYS_read, feed[0], (long)&f, 1);
            if (r != 1 || f != 'f') WRONG(r);
            fed++;
        }
        if (ns(now) > deadline_ns) break;
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    CHECK(setitimer(ITIMER_REAL, &off, NULL) == 0);
    printf("iterations=%ld handled=%ld at_syscall=%ld after_syscall=%ld sleeps=%ld fed=%ld "
           "ended=%+ld us\n",
           iterations, (long)handled, (long)at_syscall, (long)after_syscall, sleeps, fed,
           ended_ns ? (ended_ns - deadline_ns) / 1000 : 0);
    if (wrong) printf("wrong=%ld, first at line %d (value %ld)\n", wrong, wrong_line, wrong_value);
    CHECK(wrong == 0);
    CHECK(clobbered == 0);
    CHECK(bad_rip == 0);
    CHECK(handler_wrong == 0);
    /* A storm is a storm: hundreds of handler runs at the least (1% of the timer's
     * expirations: on two cores with other work running, a preempted process handles one
     * signal for many expirations), some of which stopped the app at a syscall (it spends
     * most of its time in one), and the app made every kind of call under it. */
    CHECK(handled >= (long)(seconds * 1e6 / period_us / 100));
    CHECK(at_syscall + after_syscall > 0);
    CHECK(sleeps > 0 && fed > 0);
    if (wrong || clobbered) printf("wrong=%ld clobbered=%ld\n", wrong, clobbered);
    DONE();
}
