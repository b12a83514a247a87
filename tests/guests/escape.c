/* A hostile tenant: tries to reach host files and sockets through every path-taking call.
 *
 *   escape PATH...   for each PATH (a symlink, or a path through one, planted by the
 *                    image or the data directory): chmod, fchmodat, chown, lchown,
 *                    utimensat, open for writing, truncate by O_TRUNC, connect as an
 *                    AF_UNIX socket, bind through it, mkdir/rename/unlink through it.
 *                    Prints one line per attempt that the sandbox let through; the test
 *                    judges by the host's files and sockets, which must be untouched.
 *   setid DIR        creates files in DIR and tries to make them set-user-ID and
 *                    set-group-ID; prints the modes the files end up with.
 *   device           opens /dev/null and tries to change it.
 *   network PORT     tries to reach a host service on 127.0.0.1:PORT, to bind the
 *                    host's addresses, to open host-level sockets and to use privileged
 *                    socket options; prints the address its binds to 0.0.0.0 get.
 */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <stdlib.h>
#include <linux/netlink.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

static int let_through;

static void attempt(const char *what, const char *path, long rc) {
    if (rc >= 0) {
        let_through++;
        printf("LET THROUGH: %s %s (rc %ld)\n", what, path, rc);
    } else {
        printf("refused: %s %s (%s)\n", what, path, strerror(errno));
    }
}

static long unix_call(const char *path, int binding) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    long rc = binding ? bind(s, (void *)&a, sizeof a) : connect(s, (void *)&a, sizeof a);
    close(s);
    return rc;
}

static void try_path(const char *path) {
    struct timespec times[2] = {{.tv_sec = 1000000}, {.tv_sec = 1000000}};
    char child[4096];
    attempt("chmod", path, chmod(path, 0777));
    attempt("fchmodat", path, fchmodat(AT_FDCWD, path, 04777, 0));
    attempt("chown", path, chown(path, 1234, 1234));
    attempt("lchown", path, lchown(path, 1234, 1234));
    attempt("utimensat", path, utimensat(AT_FDCWD, path, times, 0));
    int fd = open(path, O_WRONLY | O_APPEND);
    attempt("open-write", path, fd);
    if (fd >= 0) {
        attempt("write", path, write(fd, "escaped\n", 8));
        attempt("fchmod", path, fchmod(fd, 04777));
        attempt("futimens", path, futimens(fd, times));
        close(fd);
    }
    fd = open(path, O_RDONLY);
    if (fd >= 0) {
        /* Reading is allowed only for files that are really inside the sandbox; the test
         * plants no such file behind these paths. */
        char buf[64];
        long n = read(fd, buf, sizeof buf);
        attempt("read", path, n > 0 ? n : -1);
        attempt("fchmod-readonly-fd", path, fchmod(fd, 04777));
        close(fd);
    }
    attempt("truncate", path, open(path, O_WRONLY | O_TRUNC));
    attempt("connect", path, unix_call(path, 0));
    snprintf(child, sizeof child, "%s/planted.sock", path);
    attempt("bind-through", child, unix_call(child, 1));
    snprintf(child, sizeof child, "%s/planted-dir", path);
    attempt("mkdir-through", child, mkdir(child, 0777));
    snprintf(child, sizeof child, "%s/planted-file", path);
    attempt("create-through", child, open(child, O_CREAT | O_WRONLY, 0666));
    snprintf(child, sizeof child, "%s/secret", path);
    attempt("unlink-through", child, unlink(child));
    attempt("rename-through", child, rename(child, "/tmp/stolen"));
    attempt("link", path, link(path, "/tmp/hardlink"));
    attempt("symlink", path, symlink(path, "/tmp/newlink"));
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "escape")) {
        for (int i = 2; i < argc; i++) try_path(argv[i]);
        printf("%d let through\n", let_through);
        return 0;
    }
    if (!strcmp(mode, "setid") && argc > 2) {
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/made-setuid", argv[2]);
        int fd = open(path, O_CREAT | O_WRONLY, 06755);
        CHECK(fd >= 0);
        CHECK(fstat(fd, &st) == 0);
        printf("created %o\n", st.st_mode & 07777);
        fchmod(fd, 04755);
        CHECK(fstat(fd, &st) == 0);
        printf("after fchmod %o\n", st.st_mode & 07777);
        chmod(path, 02755);
        CHECK(stat(path, &st) == 0);
        printf("after chmod %o\n", st.st_mode & 07777);
        snprintf(path, sizeof path, "%s/made-setgid-dir", argv[2]);
        CHECK(mkdir(path, 02777) == 0);
        CHECK(stat(path, &st) == 0);
        printf("mkdir %o\n", st.st_mode & 07777);
        /* What the app makes is its own: uid 0 in its view, whatever user its VMM is. */
        CHECK(stat(path, &st) == 0 && st.st_uid == 0 && st.st_gid == 0);
        CHECK(chown(path, 0, 0) == 0);
        CHECK(chown("/no/such/file", 0, 0) == -1 && errno == ENOENT);
        CHECK(fchown(999, 0, 0) == -1 && errno == EBADF);
        DONE();
    }
    if (!strcmp(mode, "links")) {
        /* Links inside a writable mount work as on Linux; none leads out of it. */
        int fd = open("/data/own", O_CREAT | O_WRONLY, 0644);
        CHECK(fd >= 0 && write(fd, "own", 3) == 3);
        close(fd);
        CHECK(link("/data/own", "/data/own-link") == 0);
        struct stat st;
        CHECK(stat("/data/own", &st) == 0 && st.st_nlink == 2);
        CHECK(symlink("own", "/data/own-sym") == 0);
        char target[64] = {0};
        CHECK(readlink("/data/own-sym", target, sizeof target - 1) == 3 && !strcmp(target, "own"));
        CHECK(linkat(AT_FDCWD, "/data/own-sym", AT_FDCWD, "/data/own-followed", AT_SYMLINK_FOLLOW) == 0);
        CHECK(stat("/data/own", &st) == 0 && st.st_nlink == 3);
        CHECK(linkat(AT_FDCWD, "/data/own-sym", AT_FDCWD, "/data/sym-itself", 0) == 0);
        CHECK(lstat("/data/sym-itself", &st) == 0 && S_ISLNK(st.st_mode));
        /* A planted symlink to a host file is followed inside the mount: nothing there. */
        CHECK(linkat(AT_FDCWD, "/data/abs-file", AT_FDCWD, "/data/stolen", AT_SYMLINK_FOLLOW) == -1 && errno == ENOENT);
        /* The read-only root's files (shared with other apps) get no writable name. */
        CHECK(link("/bin/escape", "/data/escape") == -1 && (errno == EXDEV || errno == EROFS));
        CHECK(symlink("/data/own", "/in-root") == -1 && errno == EROFS);
        /* Across two writable mounts: EXDEV, as across two mounts on Linux. */
        CHECK(link("/data/own", "/tmp/own") == -1 && errno == EXDEV);
        DONE();
    }
    if (!strcmp(mode, "device")) {
        int fd = open("/dev/null", O_RDWR);
        CHECK(fd >= 0);
        CHECK(fchmod(fd, 0666) == -1 && errno == EPERM);
        CHECK(chmod("/dev/null", 0600) == -1 && errno == EPERM);
        CHECK(futimens(fd, NULL) == -1 && errno == EPERM);
        CHECK(fchown(fd, 0, 0) == -1 && errno == EPERM);
        CHECK(unlink("/dev/null") == -1);
        CHECK(rename("/dev/null", "/dev/gone") == -1);
        CHECK(write(fd, "x", 1) == 1);
        DONE();
    }
    if (!strcmp(mode, "network") && argc > 2) {
        int port = atoi(argv[2]);
        struct sockaddr_in host = {.sin_family = AF_INET, .sin_port = htons(port)};
        inet_pton(AF_INET, "127.0.0.1", &host.sin_addr);
        /* 127.0.0.1 is the app itself: the host's service on that port is not reached
         * (nothing of the app's listens there). */
        int s = socket(AF_INET, SOCK_STREAM, 0);
        CHECK(connect(s, (void *)&host, sizeof host) == -1 && errno == ECONNREFUSED);
        close(s);
        struct sockaddr_in other = host;
        inet_pton(AF_INET, "127.0.0.2", &other.sin_addr);
        s = socket(AF_INET, SOCK_STREAM, 0);
        CHECK(connect(s, (void *)&other, sizeof other) == -1 && errno == ENETUNREACH);
        close(s);
        s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in mine = {.sin_family = AF_INET};
        inet_pton(AF_INET, "127.0.0.2", &mine.sin_addr);
        CHECK(bind(s, (void *)&mine, sizeof mine) == -1 && errno == EADDRNOTAVAIL);
        mine.sin_addr.s_addr = htonl(INADDR_ANY);
        CHECK(bind(s, (void *)&mine, sizeof mine) == 0);
        socklen_t len = sizeof mine;
        CHECK(getsockname(s, (void *)&mine, &len) == 0);
        char text[32];
        inet_ntop(AF_INET, &mine.sin_addr, text, sizeof text);
        printf("bound to %s\n", text);
        int big = 1 << 30;
        CHECK(setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) == -1 && errno == EPERM);
        CHECK(setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) == -1 && errno == EPERM);
        CHECK(setsockopt(s, SOL_SOCKET, SO_MARK, &big, sizeof big) == -1 && errno == EPERM);
        close(s);
        /* rtnetlink is the VMM's own, read-only (tests/guests/abi.c); no other netlink. */
        CHECK(socket(AF_NETLINK, SOCK_RAW, NETLINK_KOBJECT_UEVENT) == -1);
        CHECK(socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER) == -1);
        CHECK(socket(AF_PACKET, SOCK_RAW, 0) == -1);
        CHECK(socket(AF_INET, SOCK_RAW, IPPROTO_ICMP) == -1);
        DONE();
    }
    printf("unknown mode %s\n", mode);
    return 100;
}
