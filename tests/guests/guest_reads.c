/* pread64, fstat and fstat-by-newfstatat on a file of the read-only root, many times over
 * (so that a picoprocess answers them in the guest, from a file window), with the edge
 * cases Linux defines: offsets at and past the end, empty reads, negative offsets, bad,
 * read-only and not-yet-touched buffers, closed fds and fds that come to name a pipe.
 * Everything it prints must match a native run byte for byte. Usage: guest_reads FILE */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static uint32_t fnv(const unsigned char *p, long n) {
    uint32_t h = 2166136261u;
    for (long i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

/* One pread, printed: what it returned (or errno) and a digest of what it read. */
static void show(int fd, void *buf, size_t count, off_t offset) {
    errno = 0;
    ssize_t n = pread(fd, buf, count, offset);
    if (n < 0) printf("pread(%zu @ %lld) = -1 errno %d\n", count, (long long)offset, errno);
    else printf("pread(%zu @ %lld) = %zd sum %08x\n", count, (long long)offset, n,
                fnv(buf, n));
}

/* One read, printed with the offset it leaves. */
static void show_read(int fd, void *buf, size_t count) {
    errno = 0;
    ssize_t n = read(fd, buf, count);
    int saved = errno;
    long long at = lseek(fd, 0, SEEK_CUR);
    if (n < 0) printf("read(%zu) = -1 errno %d, at %lld\n", count, saved, at);
    else printf("read(%zu) = %zd sum %08x, at %lld\n", count, n, fnv(buf, n), at);
}

/* One lseek, printed. */
static void show_seek(int fd, long long offset, int whence) {
    errno = 0;
    long long at = lseek(fd, offset, whence);
    printf("lseek(%lld, %d) = %lld errno %d\n", offset, whence, at, at < 0 ? errno : 0);
}

/* read and lseek, whose offset the guest may keep: sequential reads to the end, seeks of
 * every kind, bad buffers, and the offset shared with a dup and with a forked child. */
static void reads_and_seeks(const char *path, long size, unsigned char *buf) {
    int fd = open(path, O_RDONLY);
    for (int i = 0; i < 8; i++) show_read(fd, buf, 1000);
    int left = -1;
    CHECK(ioctl(fd, FIONREAD, &left) == 0);
    printf("FIONREAD %d\n", left);
    show_seek(fd, 5000, SEEK_SET);
    show_read(fd, buf, 100);
    show_seek(fd, -50, SEEK_CUR);
    show_read(fd, buf, 100);
    show_seek(fd, -10, SEEK_END);
    show_read(fd, buf, 100);
    show_read(fd, buf, 100);
    show_seek(fd, 100, SEEK_END);
    show_read(fd, buf, 100);
    show_seek(fd, -1, SEEK_SET);
    show_seek(fd, -(size + 1000), SEEK_CUR);
    /* (Not a seek far past the end: how far a file may go is its filesystem's.) */
    show_seek(fd, 100, SEEK_CUR);
    show_seek(fd, 0, SEEK_DATA);
    show_seek(fd, 0, 7);
    show_seek(fd, 0, SEEK_SET);
    show_read(fd, NULL, 10);
    show_read(fd, (void *)0x7ffffffffff8, 16);
    show_read(fd, buf, 0);
    /* pread64 leaves the offset alone. */
    CHECK(pread(fd, buf, 10, 300) == 10);
    show_seek(fd, 0, SEEK_CUR);
    /* A read through a dup moves the offset the original sees. */
    show_read(fd, buf, 64);
    int twin = dup(fd);
    show_read(twin, buf, 100);
    show_seek(fd, 0, SEEK_CUR);
    show_read(fd, buf, 10);
    show_seek(twin, 0, SEEK_CUR);
    close(twin);
    show_read(fd, buf, 10);
    close(fd);
    /* A forked child's read moves the offset its parent sees. */
    fd = open(path, O_RDONLY);
    for (int i = 0; i < 6; i++) show_read(fd, buf, 10);
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        _exit(read(fd, buf, 100) == 100 ? 0 : 1);
    }
    int status = -1;
    CHECK(waitpid(child, &status, 0) == child && status == 0);
    show_seek(fd, 0, SEEK_CUR);
    show_read(fd, buf, 10);
    close(fd);
}

static int raw_fstatat_empty(int fd, struct stat *st) {
    return syscall(SYS_newfstatat, fd, "", st, AT_EMPTY_PATH);
}

/* `guest_reads FILE watch`: reads FILE every 50 ms, 80 times, printing what it sees, so
 * that a test can change the file on the host meanwhile. */
static int watch(const char *path) {
    setvbuf(stdout, NULL, _IONBF, 0);
    static unsigned char buf[65536];
    int fd = open(path, O_RDONLY);
    for (int i = 0; i < 80; i++) {
        struct stat st;
        ssize_t n = pread(fd, buf, sizeof buf, 8192);
        CHECK(fstat(fd, &st) == 0);
        printf("%d: pread %zd size %ld\n", i, n, (long)st.st_size);
        usleep(50000);
    }
    DONE();
}

/* `guest_reads FILE huge`: a read at an offset whose offset + count overflows fails with
 * EINVAL, as Linux checks it, even past the end of the file. Only a filesystem that lets
 * a file's offset go that far (tmpfs, XFS; not ext4) lets the seek before it succeed. */
static int huge(const char *path) {
    static unsigned char buf[4096];
    int fd = open(path, O_RDONLY);
    for (int i = 0; i < 6; i++) CHECK(read(fd, buf, 16) == 16);
    if (lseek(fd, 0x7fffffffffffff00LL, SEEK_SET) < 0) {
        printf("the seek was refused (errno %d)\n", errno);
        DONE();
    }
    errno = 0;
    CHECK(read(fd, buf, 0x200) == -1 && errno == EINVAL);
    errno = 0;
    CHECK(read(fd, buf, 0x10) == 0);
    printf("read past the largest offset: errno %d\n", errno);
    DONE();
}

int main(int argc, char **argv) {
    if (argc < 2) { printf("usage: guest_reads FILE [watch|huge]\n"); return 2; }
    const char *path = argv[1];
    if (argc > 2 && strcmp(argv[2], "watch") == 0) return watch(path);
    if (argc > 2 && strcmp(argv[2], "huge") == 0) return huge(path);
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    struct stat by_path, by_fd, by_at;
    CHECK(stat(path, &by_path) == 0);
    long size = by_path.st_size;
    CHECK(size > 20000);
    static unsigned char buf[1 << 16];
    long offsets[] = {0, 1, 7, 4095, 4096, 12345, size - 9, size - 1, size, size + 100};
    size_t counts[] = {0, 1, 7, 8, 9, 4096, 10000, 65536};
    for (int round = 0; round < 3; round++) {
        for (unsigned i = 0; i < sizeof offsets / sizeof *offsets; i++)
            for (unsigned j = 0; j < sizeof counts / sizeof *counts; j++)
                show(fd, buf, counts[j], offsets[i]);
        CHECK(fstat(fd, &by_fd) == 0);
        CHECK(raw_fstatat_empty(fd, &by_at) == 0);
        CHECK(by_fd.st_ino == by_path.st_ino && by_fd.st_dev == by_path.st_dev);
        CHECK(by_fd.st_size == size && by_at.st_size == size);
        CHECK(by_fd.st_mode == by_path.st_mode && by_at.st_mode == by_path.st_mode);
        CHECK(by_fd.st_mtim.tv_sec == by_path.st_mtim.tv_sec);
        CHECK(by_fd.st_uid == by_path.st_uid && by_fd.st_gid == by_path.st_gid);
        /* (Not st_nlink: other tests link this program into their roots meanwhile.) */
        CHECK(by_at.st_ino == by_path.st_ino);
        printf("fstat size %ld mode %o uid %d gid %d\n", (long)by_fd.st_size, by_fd.st_mode,
               by_fd.st_uid, by_fd.st_gid);
    }
    /* The whole file in one read equals the file read with read(2). */
    unsigned char *whole = malloc(size), *again = malloc(size);
    CHECK(pread(fd, whole, size, 0) == size);
    int other = open(path, O_RDONLY);
    long got = 0;
    while (got < size) { ssize_t n = read(other, again + got, size - got); if (n <= 0) break; got += n; }
    CHECK(got == size && memcmp(whole, again, size) == 0);
    close(other);
    /* A negative offset, a null buffer, a buffer running past user space. */
    show(fd, buf, 10, -1);
    show(fd, NULL, 10, 0);
    show(fd, (void *)0x7ffffffffff8, 16, 0);
    show(fd, buf, 0, -5);
    /* The whole buffer is checked before the file is read: a count running past user space
     * fails even where the file has less to give, and offset + count must not overflow. */
    unsigned char *near = buf + 64;
    show(fd, near, 1UL << 47, 0);
    show(fd, (void *)0x7fffffffe000, 0x2000, size);
    show(fd, buf, 10, 0x7ffffffffffffff8LL);
    /* A fresh anonymous mapping (its pages appear on the first touch), across pages. */
    unsigned char *fresh = mmap(NULL, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(fresh != MAP_FAILED);
    show(fd, fresh + 4000, 20000, 100);
    CHECK(memcmp(fresh + 4000, whole + 100, 20000) == 0);
    /* A read-only buffer. */
    unsigned char *ro = mmap(NULL, 8192, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    show(fd, ro, 100, 0);
    /* A buffer whose second page is gone, or read-only: Linux reads up to it. */
    unsigned char *half = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(munmap(half + 4096, 4096) == 0);
    show(fd, half + 100, 8000, 0);
    show(fd, half, 4096, 0);
    CHECK(mprotect(half, 4096, PROT_READ) == 0);
    show(fd, half, 100, 0);
    unsigned char *split = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(mprotect(split + 4096, 4096, PROT_READ) == 0);
    show(fd, split + 4000, 1000, 0);
    /* A count far beyond the buffer, near the end of the file: Linux reads what is left. */
    show(fd, buf, 1UL << 40, size - 4);
    /* fstat into a bad buffer. */
    errno = 0;
    int rc = fstat(fd, NULL);
    printf("fstat(NULL) = %d errno %d\n", rc, errno);
    errno = 0;
    rc = raw_fstatat_empty(fd, NULL);
    printf("newfstatat(\"\", NULL) = %d errno %d\n", rc, errno);
    /* The fd closed, then a pipe at the same number: nothing is read from the old file. */
    CHECK(close(fd) == 0);
    show(fd, buf, 10, 0);
    errno = 0;
    rc = fstat(fd, &by_fd);
    printf("fstat(closed) = %d errno %d\n", rc, errno);
    int pipefd[2];
    CHECK(pipe(pipefd) == 0);
    CHECK(pipefd[0] == fd);
    show(fd, buf, 10, 0);
    CHECK(fstat(fd, &by_fd) == 0 && S_ISFIFO(by_fd.st_mode));
    close(pipefd[0]);
    close(pipefd[1]);
    /* dup2 over a file that is being read: the fd names the pipe from then on. */
    fd = open(path, O_RDONLY);
    for (int i = 0; i < 4; i++) show(fd, buf, 16, 64);
    CHECK(pipe(pipefd) == 0);
    CHECK(dup2(pipefd[0], fd) == fd);
    show(fd, buf, 16, 64);
    CHECK(fstat(fd, &by_fd) == 0 && S_ISFIFO(by_fd.st_mode));
    close(fd);
    close(pipefd[0]);
    close(pipefd[1]);
    /* Many fds: the high ones are read too. */
    int fds[80];
    for (int i = 0; i < 80; i++) { fds[i] = open(path, O_RDONLY); CHECK(fds[i] >= 0); }
    uint32_t sums = 0;
    for (int round = 0; round < 3; round++)
        for (int i = 0; i < 80; i++) {
            CHECK(pread(fds[i], buf, 512, 1000 + i) == 512);
            CHECK(memcmp(buf, whole + 1000 + i, 512) == 0);
            sums ^= fnv(buf, 512);
        }
    printf("80 fds: %08x\n", sums);
    for (int i = 0; i < 80; i++) close(fds[i]);
    /* A loop long enough to show whether the reads leave the guest. */
    reads_and_seeks(path, size, buf);
    /* Windows made and taken down over and over. */
    uint32_t churn = 0;
    for (int i = 0; i < 300; i++) {
        int f = open(path, O_RDONLY);
        for (int k = 0; k < 6; k++) {
            CHECK(pread(f, buf, 64, i * 13 + k) == 64);
            churn ^= fnv(buf, 64);
        }
        close(f);
    }
    printf("churn %08x\n", churn);
    fd = open(path, O_RDONLY);
    uint32_t loop = 0;
    for (int i = 0; i < 5000; i++) {
        CHECK(pread(fd, buf, 256, (i * 97) % (size - 256)) == 256);
        loop ^= fnv(buf, 256);
        CHECK(fstat(fd, &by_fd) == 0);
    }
    printf("loop %08x\n", loop);
    DONE();
}
