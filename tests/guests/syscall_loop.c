/* A loop of forwarded syscalls whose every result is checked: lseek(fd, i, SEEK_SET) must
 * return i, and pread of one byte at i must return the byte written there. This proves that
 * the arguments reach the VMM and that the app resumes after each `syscall` with its
 * result, its registers and its flags intact (on hardware KVM every return goes through
 * the VMM's CPL 0 -> CPL 3 fix-up). Usage: syscall_loop N. Prints the ns per call. */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long raw3(long nr, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(nr), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    char path[] = "/tmp/syscall-loop-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    unsigned char bytes[256];
    for (int i = 0; i < 256; i++) bytes[i] = (unsigned char)(i * 7 + 1);
    CHECK(write(fd, bytes, sizeof bytes) == sizeof bytes);

    /* Callee-saved registers and the flags must survive; the compiler relies on it, so a
     * value kept live across the loop and checked after it catches a clobber. */
    uint64_t canary = 0x0123456789abcdefull ^ (uint64_t)n;
    long bad = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) {
        long off = i % 256;
        if (raw3(SYS_lseek, fd, off, SEEK_SET) != off) bad++;
        unsigned char b = 0;
        if (syscall(SYS_pread64, fd, &b, 1, off) != 1 || b != bytes[off]) bad++;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    CHECK(bad == 0);
    CHECK(canary == (0x0123456789abcdefull ^ (uint64_t)n));
    /* A bad fd is an error value, not a crash. */
    CHECK(raw3(SYS_lseek, 9999, 0, SEEK_SET) == -EBADF);
    double ns = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (2.0 * n);
    printf("%ld calls, %.1f ns per call\n", 2 * n, ns);
    DONE();
}
