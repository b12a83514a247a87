/* Measures the cost of one round trip to the host, two ways:
 *   getppid N    N raw getppid syscalls (forwarded by the VMM; natively, the kernel's)
 *   getpid N     N raw getpid syscalls (answered inside the doorbell, with no exit)
 *   clock_gettime N  N clock_gettime(CLOCK_MONOTONIC) calls through libc (the vDSO)
 *   clock_gettime_syscall N  the same as raw syscalls (answered in the doorbell)
 *   mmio-exit N  N stores to the picoprocess's calibration page (a bare exit)
 * Prints "<ns per iteration>" measured with CLOCK_MONOTONIC around the loop.
 *   getppid-dist N  N getppid calls, each timed on its own: prints
 *                "<mean> <p50> <p90> <p99> <p99.9> <max>" in ns per call. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CALIBRATION_MMIO_VA 0xffffffff80101000ull

static int64_t now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000ll + t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int distribution(long n) {
    if (n < 1) return 2;
    int64_t *costs = malloc(sizeof(int64_t) * (size_t)n);
    if (!costs) return 1;
    int64_t total = 0;
    for (long i = 0; i < n; i++) {
        int64_t start = now();
        long r;
        __asm__ volatile("syscall" : "=a"(r) : "a"((long)SYS_getppid) : "rcx", "r11", "memory");
        costs[i] = now() - start;
        total += costs[i];
    }
    qsort(costs, (size_t)n, sizeof(int64_t), by_value);
    printf("%.1f %lld %lld %lld %lld %lld\n", (double)total / (double)n,
           (long long)costs[n / 2], (long long)costs[n * 9 / 10], (long long)costs[n * 99 / 100],
           (long long)costs[n * 999 / 1000], (long long)costs[n - 1]);
    free(costs);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s getppid|mmio-exit N\n", argv[0]); return 2; }
    long n = atol(argv[2]);
    if (!strcmp(argv[1], "getppid-dist")) return distribution(n);
    int64_t start = now();
    if (!strcmp(argv[1], "getppid")) {
        for (long i = 0; i < n; i++) {
            long r;
            __asm__ volatile("syscall" : "=a"(r) : "a"((long)SYS_getppid) : "rcx", "r11", "memory");
        }
    } else if (!strcmp(argv[1], "getpid")) {
        for (long i = 0; i < n; i++) {
            long r;
            __asm__ volatile("syscall" : "=a"(r) : "a"((long)SYS_getpid) : "rcx", "r11", "memory");
        }
    } else if (!strcmp(argv[1], "clock_gettime")) {
        struct timespec t;
        for (long i = 0; i < n; i++) clock_gettime(CLOCK_MONOTONIC, &t);
    } else if (!strcmp(argv[1], "clock_gettime_syscall")) {
        struct timespec t;
        for (long i = 0; i < n; i++) {
            long r;
            __asm__ volatile("syscall" : "=a"(r)
                             : "a"((long)SYS_clock_gettime), "D"((long)CLOCK_MONOTONIC), "S"(&t)
                             : "rcx", "r11", "memory");
        }
    } else if (!strcmp(argv[1], "mmio-exit")) {
        for (long i = 0; i < n; i++) *(volatile uint8_t *)CALIBRATION_MMIO_VA = 0;
    } else {
        return 2;
    }
    int64_t elapsed = now() - start;
    printf("%.1f\n", (double)elapsed / (double)n);
    return 0;
}
