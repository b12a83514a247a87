/* Signal delivery to handlers. Modes: "ok" runs every check; the others end in a signal. */
#define _GNU_SOURCE
#include "check.h"
#include <errno.h>
#include <signal.h>
#include <time.h>
#include <stdlib.h>
#include <sys/time.h>
#include <ucontext.h>
#include <unistd.h>

static volatile sig_atomic_t got, info_code, alarms;
static volatile void *fault_addr;
static volatile double fp_in_handler;

static void on_usr1(int sig) { got = sig; fp_in_handler = 1.5 * sig; }
static void on_info(int sig, siginfo_t *si, void *uc) { (void)uc; got = sig; info_code = si->si_signo; }
static void on_alarm(int sig) { (void)sig; alarms++; }
static void on_segv(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    fault_addr = si->si_addr;
    ucontext_t *uc = ctx;
    uc->uc_mcontext.gregs[REG_RIP] += 3; /* skip the faulting 3-byte store */
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "ok";
    if (!strcmp(mode, "term")) { kill(getpid(), SIGTERM); pause(); return 0; }
    if (!strcmp(mode, "abort")) abort();
    if (!strcmp(mode, "vdso-clock-under-signals")) {
        /* The monotonic clock read through the vDSO, again and again for 1.5 s while a
         * 1 ms timer interrupts the loop: it never goes back, and the app never dies. (A read the VMM's rewrite
         * of the time page cut in two once came out ~100 ms ahead, and the next behind.) */
        signal(SIGALRM, on_alarm);
        struct itimerval every_ms = {{0, 1000}, {0, 1000}};
        setitimer(ITIMER_REAL, &every_ms, NULL);
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        long start = t.tv_sec * 1000000000L + t.tv_nsec, previous = start, backwards = 0;
        long rounds = 0;
        while (previous - start < 1500000000L) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            long now = t.tv_sec * 1000000000L + t.tv_nsec;
            if (now < previous) backwards++;
            previous = now;
            /* Now and then a clock the vDSO passes on to the VMM with its own `syscall`:
             * a kick in the doorbell then must bring the app back into the vDSO. */
            if (++rounds % 64 == 0) {
                struct timespec cpu;
                clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
            }
        }
        struct itimerval off = {{0, 0}, {0, 0}};
        setitimer(ITIMER_REAL, &off, NULL);
        printf("%ld steps back in %d signals\n", backwards, (int)alarms);
        return backwards != 0;
    }
    if (!strcmp(mode, "unblock-then-spin")) {
        /* A timer signal raised while blocked stays pending; one raised after the mask
         * lets it through (a mask change the mailbox may answer) must interrupt a loop that
         * makes no call, at once. Prints how long the loop ran after the timer was due. */
        signal(SIGALRM, on_alarm);
        sigset_t alarm_set;
        sigemptyset(&alarm_set);
        sigaddset(&alarm_set, SIGALRM);
        long worst = 0;
        for (int round = 0; round < 10; round++) {
            sigprocmask(SIG_BLOCK, &alarm_set, NULL);
            int before = alarms;
            struct timespec set, now;
            clock_gettime(CLOCK_MONOTONIC, &set);
            struct itimerval in_20ms = {{0, 0}, {0, 20000}};
            setitimer(ITIMER_REAL, &in_20ms, NULL);
            /* A few calls, so that the poller is awake for the unblock. */
            for (int i = 0; i < 20; i++) getppid();
            sigprocmask(SIG_UNBLOCK, &alarm_set, NULL);
            long since_set_ms = 0;
            while (alarms == before && since_set_ms < 2000) {
                clock_gettime(CLOCK_MONOTONIC, &now);
                since_set_ms = (now.tv_sec - set.tv_sec) * 1000 + (now.tv_nsec - set.tv_nsec) / 1000000;
            }
            long late = since_set_ms > 20 ? since_set_ms - 20 : 0;
            if (late > worst) worst = late;
        }
        printf("handled at most %ld ms after the timer was due\n", worst);
        return 0;
    }
    if (!strcmp(mode, "sigpipe")) {
        int p[2];
        pipe(p);
        close(p[0]);
        write(p[1], "x", 1);
        return 0;
    }
    if (!strcmp(mode, "wait-term")) {
        /* Waits for an operator's SIGTERM; the handler makes it exit 0. SIGTERM stays
         * blocked except inside sigsuspend: with `while (!got) pause();` a SIGTERM
         * delivered after the test but before pause() (at a page fault on pause's code,
         * say, as on Linux) leaves pause() waiting for ever. */
        signal(SIGTERM, on_usr1);
        sigset_t term, unblocked;
        sigemptyset(&term);
        sigaddset(&term, SIGTERM);
        sigprocmask(SIG_BLOCK, &term, &unblocked);
        printf("waiting\n");
        fflush(stdout);
        while (got != SIGTERM) sigsuspend(&unblocked);
        printf("got SIGTERM\n");
        return 0;
    }
    if (!strcmp(mode, "ignore-term")) {
        signal(SIGTERM, SIG_IGN);
        printf("ignoring SIGTERM\n");
        fflush(stdout);
        for (;;) pause();
    }
    if (!strcmp(mode, "ignore-hup-sleep")) {
        /* An ignored signal must not interrupt a blocking call. */
        signal(SIGHUP, SIG_IGN);
        printf("sleeping\n");
        fflush(stdout);
        struct timespec t = {.tv_sec = 1};
        if (nanosleep(&t, NULL) != 0) { printf("interrupted: errno %d\n", errno); return 1; }
        printf("slept\n");
        return 0;
    }
    if (!strcmp(mode, "spin-term")) {
        signal(SIGTERM, on_usr1);
        printf("spinning\n");
        fflush(stdout);
        while (got != SIGTERM) __asm__ volatile("" ::: "memory");
        printf("got SIGTERM while computing\n");
        return 0;
    }

    /* A plain handler, and the FPU state survives it. */
    double x = 2.25;
    signal(SIGUSR1, on_usr1);
    CHECK(raise(SIGUSR1) == 0 && got == SIGUSR1 && fp_in_handler == 15.0);
    CHECK(x * 2 == 4.5);

    /* SA_SIGINFO. */
    struct sigaction sa = {0};
    sa.sa_sigaction = on_info;
    sa.sa_flags = SA_SIGINFO;
    CHECK(sigaction(SIGUSR2, &sa, NULL) == 0);
    got = 0;
    kill(getpid(), SIGUSR2);
    CHECK(got == SIGUSR2 && info_code == SIGUSR2);

    /* A blocked signal waits, then arrives when unblocked. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_BLOCK, &set, NULL);
    got = 0;
    raise(SIGUSR1);
    CHECK(got == 0);
    sigset_t pending;
    CHECK(sigpending(&pending) == 0 && sigismember(&pending, SIGUSR1));
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    CHECK(got == SIGUSR1);

    /* alarm interrupts pause(); setitimer repeats. */
    signal(SIGALRM, on_alarm);
    alarm(1);
    pause();
    CHECK(alarms == 1);
    struct itimerval it = {{0, 20000}, {0, 20000}};
    CHECK(setitimer(ITIMER_REAL, &it, NULL) == 0);
    while (alarms < 4) pause();
    struct itimerval stop = {0};
    CHECK(setitimer(ITIMER_REAL, &stop, NULL) == 0);

    /* A read interrupted by a SA_RESTART handler restarts; without it, EINTR. */
    int p[2];
    pipe(p);
    sa = (struct sigaction){0};
    sa.sa_handler = on_alarm;
    sa.sa_flags = 0;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval once = {{0, 0}, {0, 50000}};
    setitimer(ITIMER_REAL, &once, NULL);
    char c;
    CHECK(read(p[0], &c, 1) == -1 && errno == EINTR);

    /* SIGPIPE ignored: EPIPE instead. */
    signal(SIGPIPE, SIG_IGN);
    close(p[0]);
    CHECK(write(p[1], "x", 1) == -1 && errno == EPIPE);

    /* A SIGSEGV handler sees the address and can skip the faulting instruction. */
    sa = (struct sigaction){0};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    volatile int *nowhere = (int *)0x1000;
    __asm__ volatile("movb $1, (%0)" ::"r"(nowhere) : "memory"); /* 3 bytes: c6 00 01 */
    CHECK(fault_addr == (void *)0x1000);

    DONE();
}
