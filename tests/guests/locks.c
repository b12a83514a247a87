/* File locks as Linux has them, on the host file, so that apps sharing a data directory
 * see each other's.
 *
 *   locks hold FILE SECS    takes a write lock (fcntl) and an flock on FILE, says "held",
 *                           and keeps them SECS seconds.
 *   locks probe FILE        checks what another app holding FILE's locks looks like.
 *   locks self FILE         checks the app's own locks: they never conflict with it, and
 *                           F_GETLK says F_UNLCK for them; OFD locks do conflict.
 */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <signal.h>
#include <unistd.h>

static struct flock whole(short type) {
    struct flock l = {.l_type = type, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    return l;
}

int main(int argc, char **argv) {
    if (argc < 3) return 100;
    const char *mode = argv[1], *path = argv[2];
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    CHECK(fd >= 0);
    if (!strcmp(mode, "hold") && argc > 3) {
        struct flock l = whole(F_WRLCK);
        CHECK(fcntl(fd, F_SETLK, &l) == 0);
        int other = open(path, O_RDWR);
        CHECK(flock(other, LOCK_EX | LOCK_NB) == 0);
        printf("held\n");
        fflush(stdout);
        sleep(atoi(argv[3]));
        DONE();
    }
    if (!strcmp(mode, "probe")) {
        struct flock l = whole(F_WRLCK);
        CHECK(fcntl(fd, F_GETLK, &l) == 0 && l.l_type == F_WRLCK);
        l = whole(F_RDLCK);
        CHECK(fcntl(fd, F_SETLK, &l) == -1 && (errno == EAGAIN || errno == EACCES));
        CHECK(flock(fd, LOCK_SH | LOCK_NB) == -1 && errno == EWOULDBLOCK);
        /* A blocking request waits, and a signal interrupts it. */
        alarm(1);
        signal(SIGALRM, SIG_IGN);
        struct sigaction sa = {.sa_handler = (void (*)(int))abs};
        sigaction(SIGALRM, &sa, NULL);
        l = whole(F_WRLCK);
        CHECK(fcntl(fd, F_SETLKW, &l) == -1 && errno == EINTR);
        DONE();
    }
    if (!strcmp(mode, "self")) {
        struct flock l = whole(F_WRLCK);
        CHECK(fcntl(fd, F_SETLK, &l) == 0);
        l = whole(F_WRLCK);
        CHECK(fcntl(fd, F_GETLK, &l) == 0 && l.l_type == F_UNLCK);
        int again = open(path, O_RDWR);
        l = whole(F_RDLCK);
        CHECK(fcntl(again, F_SETLK, &l) == 0); /* POSIX locks are per process */
        l = whole(F_WRLCK);
        CHECK(fcntl(again, F_OFD_GETLK, &l) == 0 && l.l_type == F_RDLCK); /* OFD ones are not */
        l = whole(F_UNLCK);
        CHECK(fcntl(fd, F_SETLK, &l) == 0);
        l = whole(F_WRLCK);
        CHECK(fcntl(again, F_OFD_SETLK, &l) == 0);
        l = whole(F_WRLCK);
        CHECK(fcntl(fd, F_OFD_SETLK, &l) == -1 && errno == EAGAIN);
        l = whole(F_WRLCK);
        l.l_whence = 42;
        CHECK(fcntl(fd, F_SETLK, &l) == -1 && errno == EINVAL);
        CHECK(fcntl(fd, F_GETLK, (void *)8) == -1 && errno == EFAULT);
        DONE();
    }
    return 100;
}
