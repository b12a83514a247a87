/* Hostile programs: each mode does one thing a VMM must survive. */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SYSTEM_VA 0xffffffff80000000ull
#define DOORBELL_VA (SYSTEM_VA + 4 * 4096)
#define DOORBELL_MMIO_VA (SYSTEM_VA + 0x100000)

int main(int argc, char **argv) {
    const char *m = argc > 1 ? argv[1] : "";
    if (!strcmp(m, "bad-pointers")) {
        char buf[8];
        CHECK(syscall(SYS_read, 0, (void *)0x10, 8) == -1 && errno == EFAULT);
        CHECK(syscall(SYS_write, 1, (void *)0xdead0000, 8) == -1 && errno == EFAULT);
        CHECK(syscall(SYS_write, 1, (void *)DOORBELL_VA, 8) == -1 && errno == EFAULT);
        CHECK(syscall(SYS_write, 1, (void *)-4096ll, 8) == -1 && errno == EFAULT);
        CHECK(syscall(SYS_openat, AT_FDCWD, (void *)0x1000, O_RDONLY) == -1 && errno == EFAULT);
        CHECK(syscall(SYS_openat, AT_FDCWD, (void *)SYSTEM_VA, O_RDONLY) == -1 && errno == EFAULT);
        CHECK(syscall(SYS_read, 0, buf, -1ll) >= -1);
        CHECK(syscall(SYS_clock_gettime, 1, (void *)0x42) == -1 && errno == EFAULT);
        DONE();
    }
    if (!strcmp(m, "write-doorbell")) *(volatile char *)DOORBELL_VA = 0;
    if (!strcmp(m, "write-gdt")) *(volatile uint64_t *)SYSTEM_VA = 0;
    if (!strcmp(m, "store-mmio")) *(volatile char *)DOORBELL_MMIO_VA = 0;
    if (!strcmp(m, "ud2")) __asm__ volatile("ud2");
    if (!strcmp(m, "hlt")) __asm__ volatile("hlt");
    if (!strcmp(m, "int3")) __asm__ volatile("int3");
    if (!strcmp(m, "cli")) __asm__ volatile("cli");
    if (!strcmp(m, "out")) __asm__ volatile("outb %%al, $0x99" ::"a"(0));
    if (!strcmp(m, "jump-kernel")) ((void (*)(void))(SYSTEM_VA + 3 * 4096))();
    if (!strcmp(m, "mmap-1tib")) {
        void *p = mmap(NULL, 1ull << 40, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CHECK(p == MAP_FAILED && errno == ENOMEM);
        void *q = mmap(NULL, 1ull << 40, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        CHECK(q != MAP_FAILED);
        CHECK(munmap(q, 1ull << 40) == 0);
        DONE();
    }
    if (!strcmp(m, "fork-bomb")) {
        /* Every child lives on (and would fork too), yet the app's process count is
         * bounded: forks past the limit give EAGAIN, and the app cleans up after. */
        static pid_t kids[1000];
        int made = 0, refused = 0;
        for (int i = 0; i < 1000; i++) {
            pid_t pid = fork();
            if (pid == 0) {
                for (int j = 0; j < 1000; j++) if (fork() == 0) for (;;) pause();
                for (;;) pause();
            }
            if (pid > 0) kids[made++] = pid;
            else refused += errno == EAGAIN;
        }
        struct rlimit limit;
        CHECK(getrlimit(RLIMIT_NPROC, &limit) == 0);
        CHECK(made > 0 && (rlim_t)made < limit.rlim_cur && refused == 1000 - made);
        for (int i = 0; i < made; i++) CHECK(kill(kids[i], SIGKILL) == 0);
        int status;
        for (int i = 0; i < made; i++)
            CHECK(waitpid(kids[i], &status, 0) == kids[i] && WTERMSIG(status) == SIGKILL);
        printf("forks: %d made, %d refused, limit %lu\n", made, refused, (unsigned long)limit.rlim_cur);
        DONE();
    }
    if (!strcmp(m, "spin")) for (;;) __asm__ volatile("" ::: "memory");
    printf("unknown mode %s\n", m);
    return 100;
}
