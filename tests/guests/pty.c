/* Pseudo-terminals as Linux has them: openpty (TIOCGPTPEER), posix_openpt with grantpt,
 * unlockpt, ptsname and an open of the slave by name, termios, window sizes, and data
 * both ways. Prints PASSED. */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

/* Reads what is there (within a second) from FD. */
static int drain(int fd, char *buf, int size) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int got = 0;
    while (got < size && poll(&p, 1, got ? 100 : 1000) == 1) {
        int n = read(fd, buf + got, size - got);
        if (n <= 0) break;
        got += n;
    }
    return got;
}

int main(void) {
    int master, slave;
    struct winsize ws = {.ws_row = 24, .ws_col = 80};
    CHECK(openpty(&master, &slave, NULL, NULL, &ws) == 0);
    CHECK(isatty(slave) && isatty(master));
    struct winsize got = {0};
    CHECK(ioctl(slave, TIOCGWINSZ, &got) == 0 && got.ws_row == 24 && got.ws_col == 80);
    struct termios t;
    CHECK(tcgetattr(slave, &t) == 0);
    cfmakeraw(&t);
    CHECK(tcsetattr(slave, TCSANOW, &t) == 0);
    struct termios back;
    CHECK(tcgetattr(slave, &back) == 0 && !(back.c_lflag & ICANON) && !(back.c_lflag & ECHO));
    char buf[64];
    CHECK(write(slave, "to master", 9) == 9);
    CHECK(drain(master, buf, sizeof buf) == 9 && !memcmp(buf, "to master", 9));
    CHECK(write(master, "to slave", 8) == 8);
    CHECK(drain(slave, buf, sizeof buf) == 8 && !memcmp(buf, "to slave", 8));
    close(slave);
    close(master);

    /* The classic way, by name. */
    int m = posix_openpt(O_RDWR | O_NOCTTY);
    CHECK(m >= 0 && grantpt(m) == 0 && unlockpt(m) == 0);
    char *name = ptsname(m);
    CHECK(name && !strncmp(name, "/dev/pts/", 9));
    int s = name ? open(name, O_RDWR | O_NOCTTY) : -1;
    CHECK(s >= 0 && isatty(s));
    /* Canonical mode with echo: a line typed at the master comes back echoed, and the
     * slave reads it as one line. */
    CHECK(write(m, "line\n", 5) == 5);
    CHECK(drain(s, buf, sizeof buf) == 5 && !memcmp(buf, "line\n", 5));
    int echoed = drain(m, buf, sizeof buf);
    CHECK(echoed >= 4 && !memcmp(buf, "line", 4));
    /* Another number is nobody's to open. */
    char other[32];
    snprintf(other, sizeof other, "/dev/pts/%d", atoi(name ? name + 9 : "0") + 1000);
    CHECK(open(other, O_RDWR) == -1 && errno == ENOENT);
    close(s);
    close(m);
    DONE();
}
