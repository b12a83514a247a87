/* Measures the cost of one round trip to the host, two ways:
 *   getppid N    N raw getppid syscalls (forwarded by the VMM; natively, the kernel's)
 *   getpid N     N raw getpid syscalls (answered inside the doorbell, with no exit)
 *   clock_gettime N  N clock_gettime(CLOCK_MONOTONIC) calls through libc (the vDSO)
 *   clock_gettime_syscall N  the same as raw syscalls (answered in the doorbell)
 *   mmio-exit N  N stores to the picoprocess's calibration page (a bare exit)
 * Prints "<ns per iteration>" measured with CLOCK_MONOTONIC around the loop. */
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

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s getppid|mmio-exit N\n", argv[0]); return 2; }
    long n = atol(argv[2]);
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
