/* Memory as a kernel would provide it. Mode "ok" checks everything that must work; the
 * other modes each end in a fault that must be reported as SIGSEGV. */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static int recurse(int depth) { volatile char pad[4096]; pad[0] = (char)depth; return recurse(depth + 1) + pad[0]; }

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "ok";
    long page = sysconf(_SC_PAGESIZE);
    if (!strcmp(mode, "munmap-touch")) {
        char *p = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        p[0] = 1;
        munmap(p, page);
        printf("touching %p after munmap\n", (void *)p);
        fflush(stdout);
        return *(volatile char *)p;
    }
    if (!strcmp(mode, "mprotect-write")) {
        char *p = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        p[0] = 1;
        mprotect(p, page, PROT_READ);
        printf("read after mprotect: %d\n", p[0]);
        fflush(stdout);
        *(volatile char *)p = 2;
        return 0;
    }
    if (!strcmp(mode, "stack-overflow")) {
        return recurse(0);
    }
    if (!strcmp(mode, "populate-beyond")) {
        /* MAP_POPULATE of more than the free memory (run with --memory 32): as on Linux
         * the mmap succeeds, what could not be populated is left to faults, and after
         * munmap all of it is free again, round after round. */
        size_t big = (32ul << 20) - 4096, half = 12ul << 20;
        for (int round = 0; round < 3; round++) {
            char *p = mmap(NULL, big, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
            if (p == MAP_FAILED) {
                printf("round %d: mmap with MAP_POPULATE: %s\n", round, strerror(errno));
                return 1;
            }
            p[0] = 1;
            munmap(p, big);
        }
        char *q = mmap(NULL, half, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (q == MAP_FAILED) return 1;
        memset(q, 1, half);
        printf("PASSED\n");
        return 0;
    }
    if (!strcmp(mode, "null")) {
        return *(volatile int *)0;
    }

    /* Anonymous memory is zeroed and writable. */
    char *a = mmap(NULL, 10 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(a != MAP_FAILED);
    CHECK(a[5 * page] == 0);
    memset(a, 0x5a, 10 * page);
    CHECK(a[10 * page - 1] == 0x5a);

    /* A hint that is free is honoured; MAP_FIXED_NOREPLACE refuses a used range. */
    char *hint = (char *)0x200000000ull;
    char *h = mmap(hint, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(h == hint);
    char *n = mmap(hint, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK(n == MAP_FAILED && errno == EEXIST);
    /* MAP_FIXED replaces what is there with fresh zeroes. */
    h[0] = 7;
    char *f = mmap(hint, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    CHECK(f == hint && f[0] == 0);

    /* A PROT_NONE reservation, then part of it made usable. */
    char *r = mmap(NULL, 64 * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    CHECK(r != MAP_FAILED);
    CHECK(mprotect(r + 8 * page, 4 * page, PROT_READ | PROT_WRITE) == 0);
    r[8 * page] = 3;
    CHECK(r[8 * page] == 3);

    /* A private file mapping sees the file; writes stay private. */
    int fd = open(argv[0], O_RDONLY);
    CHECK(fd >= 0);
    char head[16];
    CHECK(pread(fd, head, sizeof head, 0) == sizeof head);
    char *m = mmap(NULL, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    CHECK(m != MAP_FAILED && memcmp(m, head, sizeof head) == 0);
    if (m != MAP_FAILED) {
        m[0] = 'X';
        char again[16];
        CHECK(pread(fd, again, sizeof again, 0) == sizeof again && memcmp(again, head, sizeof head) == 0);
        CHECK(munmap(m, 3 * page) == 0);
    }
    close(fd);

    /* mremap: grow in place or move, keeping the contents. */
    char *g = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(g, 0x11, 4 * page);
    mmap(g + 4 * page, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0); /* block in-place growth */
    char *moved = mremap(g, 4 * page, 64 * page, MREMAP_MAYMOVE);
    CHECK(moved != MAP_FAILED && moved != g);
    CHECK(moved[0] == 0x11 && moved[4 * page - 1] == 0x11 && moved[63 * page] == 0);
    char *shrunk = mremap(moved, 64 * page, 2 * page, 0);
    CHECK(shrunk == moved);

    /* madvise(DONTNEED) gives zeroes back. */
    memset(a, 0x77, 2 * page);
    CHECK(madvise(a, 2 * page, MADV_DONTNEED) == 0);
    CHECK(a[0] == 0 && a[2 * page - 1] == 0 && a[2 * page] == 0x5a);

    /* brk grows and shrinks. */
    char *b0 = sbrk(0);
    CHECK(sbrk(1 << 20) == b0);
    b0[(1 << 20) - 1] = 9;
    CHECK(brk(b0) == 0 && sbrk(0) == b0);

    /* Bad requests fail cleanly. */
    CHECK(mmap(NULL, 1ull << 40, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED && errno == ENOMEM);
    CHECK(munmap((void *)1, page) == -1 && errno == EINVAL);
    CHECK(mprotect((void *)0x300000000ull, page, PROT_READ) == -1 && errno == ENOMEM);

    /* A large lazily populated area works page by page. */
    size_t big = 64ull << 20;
    char *l = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(l != MAP_FAILED);
    unsigned long total = 0;
    for (size_t off = 0; off < big; off += 1 << 20) { l[off] = 1; total += l[off]; }
    CHECK(total == 64);
    CHECK(munmap(l, big) == 0);

    /* A buffer mapped, touched once at the same instruction and unmapped, again and
     * again: each touch is a new fault at the same address (not one that cannot be
     * fixed), as an allocator that frees a large block and maps it again makes them.
     * 32 MiB: past what is populated at mmap time. */
    for (int round = 0; round < 8; round++) {
        volatile char *b = mmap(NULL, 32 << 20, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CHECK(b != MAP_FAILED);
        b[0] = (char)round;
        CHECK(b[0] == (char)round && munmap((void *)b, 32 << 20) == 0);
    }
    DONE();
}
