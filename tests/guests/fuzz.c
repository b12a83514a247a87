/* A syscall fuzzer in the style of trinity: makes random system calls with hostile
 * arguments (zero, -1, huge numbers, pointers into nothing, into the VMM's region, at the
 * edge of a valid buffer, structures full of extreme values) and checks only that it
 * keeps running: the VMM must answer every call with a result or an errno, never die.
 *
 *   fuzz SEED CALLS [v]   makes CALLS calls from a PRNG seeded with SEED; prints a
 *                         summary (with v, each call on stderr first).
 *
 * Calls that would end or disfigure the fuzzer itself are left out (exit, signals aimed at
 * itself, unmapping or remapping its own memory, changing its signal handling or TLS,
 * closing its stdout, creating processes). A 2 ms interval timer interrupts every call
 * that blocks. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

static uint64_t state;
static uint64_t next(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

/* Where pointer arguments point: its own mapping with a PROT_NONE page on each side,
 * so that a call told to write far past its end stops there (EFAULT) instead of
 * overwriting the fuzzer's own data, as it would on Linux. */
#define SCRATCH_SIZE (1 << 16)
static unsigned char *scratch;
static volatile unsigned long alarms;
static void on_alarm(int sig) { (void)sig; alarms++; }

static int excluded(long nr) {
    static const long never[] = {
        SYS_exit, SYS_exit_group, SYS_rt_sigreturn, SYS_kill, SYS_tgkill, SYS_tkill,
        SYS_execve, SYS_execveat, SYS_munmap, SYS_mremap, SYS_mprotect, SYS_brk,
        SYS_madvise, SYS_mmap, SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_sigaltstack,
        SYS_rt_sigsuspend, SYS_pause, SYS_setitimer, SYS_alarm, SYS_arch_prctl,
        SYS_prctl, SYS_clone, SYS_clone3, SYS_fork, SYS_vfork, SYS_close, SYS_dup2,
        SYS_dup3, SYS_close_range, SYS_rt_sigtimedwait, SYS_rt_sigqueueinfo,
        SYS_rt_tgsigqueueinfo, SYS_set_tid_address, SYS_set_robust_list, SYS_rseq,
        SYS_shmat, SYS_shmdt, SYS_remap_file_pages, SYS_pkey_mprotect, SYS_mlock2,
        SYS_io_uring_setup, SYS_userfaultfd, SYS_seccomp, SYS_ptrace,
        SYS_process_vm_writev, SYS_personality, SYS_modify_ldt, SYS_iopl, SYS_ioperm,
        SYS_reboot, SYS_exit, SYS_restart_syscall, SYS_vhangup, SYS_setsid,
    };
    for (unsigned i = 0; i < sizeof never / sizeof never[0]; i++)
        if (never[i] == nr) return 1;
    return 0;
}

/* A hostile argument. */
static uint64_t argument(void) {
    switch (next() % 16) {
    case 0: return 0;
    case 1: return (uint64_t)-1;
    case 2: return next() % 16;
    case 3: return next() % 4096;
    case 4: return 0x7fffffffffffffffull;
    case 5: return 0x8000000000000000ull;
    case 6: return (uint64_t)(scratch + next() % SCRATCH_SIZE);
    case 7: return (uint64_t)(scratch + SCRATCH_SIZE - next() % 64);
    case 8: return (uint64_t)scratch;
    case 9: return 0xffffffff80000000ull + (next() % 16) * 4096;
    case 10: return 0x1000 + next() % 0x100000;
    case 11: return next();
    case 12: return (uint64_t)-4096 + next() % 4096;
    case 13: return 1ull << (next() % 64);
    case 14: return 0x7ffffffff000ull;
    default: return next() % 256;
    }
}

/* Fills the scratch buffer with extreme values, so that structures read from it
 * (timespecs, iovecs, sockaddrs, sigsets) hold them. */
static void poison(void) {
    uint64_t *words = (uint64_t *)scratch;
    for (unsigned i = 0; i < SCRATCH_SIZE / 8; i++) {
        switch (next() % 6) {
        case 0: words[i] = 0x7fffffffffffffffull; break;
        case 1: words[i] = (uint64_t)-1; break;
        case 2: words[i] = (uint64_t)(scratch + next() % SCRATCH_SIZE); break;
        case 3: words[i] = next() % 1000000000; break;
        case 4: words[i] = 0; break;
        default: words[i] = next(); break;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 3) return 100;
    state = (strtoull(argv[1], NULL, 0) << 1) | 1;
    unsigned char *region = mmap(NULL, SCRATCH_SIZE + 8192, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) return 101;
    mprotect(region, 4096, PROT_NONE);
    mprotect(region + 4096 + SCRATCH_SIZE, 4096, PROT_NONE);
    scratch = region + 4096;
    long calls = strtol(argv[2], NULL, 0);
    int verbose = argc > 3 && argv[3][0] == 'v';
    struct sigaction sa = {.sa_handler = on_alarm};
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval every = {{0, 2000}, {0, 2000}};
    setitimer(ITIMER_REAL, &every, NULL);
    long ok = 0, failed = 0;
    for (long i = 0; i < calls; i++) {
        if (i % 64 == 0) poison();
        long nr = next() % 450;
        if (excluded(nr)) continue;
        uint64_t a[6];
        for (int j = 0; j < 6; j++) a[j] = argument();
        if (verbose)
            dprintf(2, "%ld: %ld(%#lx, %#lx, %#lx, %#lx, %#lx, %#lx)\n", i, nr, a[0], a[1], a[2],
                    a[3], a[4], a[5]);
        long rc = syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
        if (rc == -1) failed++; else ok++;
    }
    struct itimerval off = {0};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("fuzz: seed %s: %ld calls answered, %ld with an errno, %lu timer interrupts\n",
           argv[1], ok, failed, alarms);
    return 0;
}
