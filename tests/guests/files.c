/* Files inside the root only. Expects to run with a root that holds /data/hello.txt
 * ("hello, file\n"), the symlinks /escape-abs -> /etc/hostname, /escape-rel ->
 * ../../../../etc/hostname and /loop -> /loop, and a writable /tmp. */
#define _GNU_SOURCE
#include "check.h"
#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <termios.h>
#include <unistd.h>

int main(void) {
    char buf[256];

    /* Escapes all fail. */
    CHECK(open("../../etc/hostname", O_RDONLY) == -1 && errno == ENOENT);
    CHECK(open("/data/../../../etc/hostname", O_RDONLY) == -1 && errno == ENOENT);
    CHECK(open("/escape-abs", O_RDONLY) == -1 && errno == ENOENT);
    CHECK(open("/escape-rel", O_RDONLY) == -1 && errno == ENOENT);
    CHECK(open("/proc/self/root/etc/hostname", O_RDONLY) == -1 && errno == ENOENT);
    CHECK(open("/loop", O_RDONLY) == -1 && errno == ELOOP);
    CHECK(open("/data/new", O_WRONLY | O_CREAT, 0644) == -1 && errno == EROFS);
    CHECK(open("/data/hello.txt", O_RDWR) == -1 && errno == EROFS);
    CHECK(open("/data/hello.txt", O_RDONLY | O_TRUNC) == -1 && errno == EROFS);
    CHECK(mkdir("/data/d", 0755) == -1 && errno == EROFS);
    CHECK(unlink("/data/hello.txt") == -1 && errno == EROFS);
    CHECK(rename("/data/hello.txt", "/tmp/stolen") == -1 && errno == EROFS);

    /* Reading: read, pread64, readv, lseek, fstat, newfstatat, statx. */
    int fd = open("/data/hello.txt", O_RDONLY | O_CLOEXEC);
    CHECK(fd >= 0);
    CHECK(read(fd, buf, 5) == 5 && memcmp(buf, "hello", 5) == 0);
    CHECK(pread(fd, buf, 4, 7) == 4 && memcmp(buf, "file", 4) == 0);
    CHECK(lseek(fd, 0, SEEK_CUR) == 5);
    char a[2], b[3];
    struct iovec iov[2] = {{a, 2}, {b, 3}};
    CHECK(readv(fd, iov, 2) == 5 && memcmp(a, ", ", 2) == 0 && memcmp(b, "fil", 3) == 0);
    CHECK(lseek(fd, 0, SEEK_END) == 12);
    struct stat st;
    CHECK(fstat(fd, &st) == 0 && st.st_size == 12 && S_ISREG(st.st_mode));
    CHECK(fstatat(AT_FDCWD, "/data/hello.txt", &st, 0) == 0 && st.st_size == 12);
    struct statx stx;
    CHECK(statx(AT_FDCWD, "/data/hello.txt", 0, STATX_SIZE, &stx) == 0 && stx.stx_size == 12);
    CHECK(statx(fd, "", AT_EMPTY_PATH, STATX_SIZE, &stx) == 0 && stx.stx_size == 12);
    CHECK(lstat("/escape-abs", &st) == 0 && S_ISLNK(st.st_mode));
    CHECK(readlink("/escape-abs", buf, sizeof buf) == 13 && memcmp(buf, "/etc/hostname", 13) == 0);
    CHECK(readlinkat(AT_FDCWD, "/escape-abs", buf, 4) == 4);
    CHECK(ioctl(fd, TCGETS, buf) == -1 && errno == ENOTTY);

    /* access and faccessat2. */
    CHECK(access("/data/hello.txt", R_OK) == 0);
    CHECK(access("/data/hello.txt", W_OK) == -1 && errno == EROFS);
    CHECK(access("/data/missing", F_OK) == -1 && errno == ENOENT);
    CHECK(syscall(SYS_faccessat2, AT_FDCWD, "/data/hello.txt", R_OK, 0) == 0);

    /* dup, dup2, dup3, fcntl. */
    int d = dup(fd);
    CHECK(d > fd);
    CHECK(lseek(d, 1, SEEK_SET) == 1 && lseek(fd, 0, SEEK_CUR) == 1); /* shared offset */
    CHECK(dup2(fd, 40) == 40);
    CHECK(dup3(fd, 41, O_CLOEXEC) == 41 && fcntl(41, F_GETFD) == FD_CLOEXEC);
    CHECK(fcntl(fd, F_GETFD) == FD_CLOEXEC);
    CHECK(fcntl(fd, F_SETFD, 0) == 0 && fcntl(fd, F_GETFD) == 0);
    CHECK(fcntl(fd, F_DUPFD_CLOEXEC, 50) == 50 && fcntl(50, F_GETFD) == FD_CLOEXEC);
    CHECK((fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDONLY);
    CHECK(close(50) == 0 && close(50) == -1 && errno == EBADF);
    CHECK(read(1000, buf, 1) == -1 && errno == EBADF);

    /* getdents64 through readdir. */
    DIR *dir = opendir("/data");
    CHECK(dir != NULL);
    int seen = 0;
    struct dirent *e;
    while (dir && (e = readdir(dir))) seen += !strcmp(e->d_name, "hello.txt");
    CHECK(seen == 1);
    if (dir) closedir(dir);

    /* Working directory. */
    CHECK(chdir("/data") == 0);
    CHECK(getcwd(buf, sizeof buf) && !strcmp(buf, "/data"));
    CHECK(access("hello.txt", R_OK) == 0);
    CHECK(chdir("/nowhere") == -1 && errno == ENOENT);
    CHECK(chdir("..") == 0 && getcwd(buf, sizeof buf) && !strcmp(buf, "/"));

    /* Pipes. */
    int p[2];
    CHECK(pipe2(p, O_CLOEXEC) == 0);
    CHECK(write(p[1], "pipe!", 5) == 5 && read(p[0], buf, 5) == 5 && !memcmp(buf, "pipe!", 5));

    /* The writable /tmp: write, pwrite, writev, mkdir, rename, ftruncate, unlink. */
    int w = open("/tmp/out.txt", O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(w >= 0);
    CHECK(write(w, "0123456789", 10) == 10);
    CHECK(pwrite(w, "ab", 2, 3) == 2);
    struct iovec wv[2] = {{"x", 1}, {"yz", 2}};
    CHECK(writev(w, wv, 2) == 3);
    CHECK(pread(w, buf, 13, 0) == 13 && !memcmp(buf, "012ab56789xyz", 13));
    CHECK(ftruncate(w, 4) == 0 && fstat(w, &st) == 0 && st.st_size == 4);
    CHECK(mkdir("/tmp/sub", 0755) == 0);
    CHECK(rename("/tmp/out.txt", "/tmp/sub/moved.txt") == 0);
    CHECK(access("/tmp/sub/moved.txt", F_OK) == 0 && access("/tmp/out.txt", F_OK) == -1);
    CHECK(unlink("/tmp/sub/moved.txt") == 0);
    CHECK(rmdir("/tmp/sub") == 0);
    close(w);

    /* A trailing slash follows a last symlink and needs a directory, as on Linux. */
    CHECK(mkdir("/tmp/dir", 0755) == 0 && symlink("/tmp/dir", "/tmp/link") == 0);
    CHECK(symlink("/tmp/file", "/tmp/filelink") == 0);
    CHECK(close(open("/tmp/file", O_CREAT | O_WRONLY, 0644)) == 0);
    CHECK(lstat("/tmp/link", &st) == 0 && S_ISLNK(st.st_mode));
    CHECK(lstat("/tmp/link/", &st) == 0 && S_ISDIR(st.st_mode));
    CHECK(fstatat(AT_FDCWD, "/tmp/link/", &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode));
    CHECK(lstat("/tmp/file/", &st) == -1 && errno == ENOTDIR);
    CHECK(lstat("/tmp/filelink/", &st) == -1 && errno == ENOTDIR);
    CHECK(unlink("/tmp/link") == 0 && unlink("/tmp/filelink") == 0 && unlink("/tmp/file") == 0);
    CHECK(rmdir("/tmp/dir") == 0);

    /* Bad pointers are EFAULT, not crashes. */
    CHECK(read(fd, (void *)8, 4) == -1 && errno == EFAULT);
    CHECK(open((const char *)16, O_RDONLY) == -1 && errno == EFAULT);

    DONE();
}
