/* Descriptors that live through snapshots: a sealed memfd with its contents and offset,
 * an rtnetlink socket that still answers, and an open /proc/self/status (generated, as
 * redis holds /proc/<pid>/stat now and then), readable again. Prints "ready", runs SECONDS (argv[1]) of
 * its own time, then checks them and prints PASSED. */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* Asks NL for a link dump; returns how many RTM_NEWLINK messages came before NLMSG_DONE. */
static int links(int nl, unsigned seq) {
    struct { struct nlmsghdr h; struct rtgenmsg g; } req = {
        .h = {.nlmsg_len = sizeof req, .nlmsg_type = RTM_GETLINK,
              .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP, .nlmsg_seq = seq},
        .g = {.rtgen_family = AF_UNSPEC},
    };
    if (send(nl, &req, sizeof req, 0) != sizeof req) return -1;
    char buf[8192];
    int found = 0;
    for (;;) {
        ssize_t n = recv(nl, buf, sizeof buf, 0);
        if (n <= 0) return -1;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != seq) return -1;
            if (h->nlmsg_type == NLMSG_DONE) return found;
            found += h->nlmsg_type == RTM_NEWLINK;
        }
    }
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1;
    int mem = memfd_create("kept", MFD_ALLOW_SEALING);
    CHECK(mem >= 0 && write(mem, "snapshotted bytes", 17) == 17);
    CHECK(lseek(mem, 4, SEEK_SET) == 4);
    CHECK(fcntl(mem, F_ADD_SEALS, F_SEAL_SHRINK) == 0);
    int nl = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    CHECK(nl >= 0 && links(nl, 1) == 1);
    int status = open("/proc/self/status", O_RDONLY);
    CHECK(status >= 0);
    printf("ready\n");
    fflush(stdout);
    double end = now() + seconds;
    while (now() < end) usleep(20000);
    char buf[32];
    CHECK(read(mem, buf, 13) == 13 && !memcmp(buf, "shotted bytes", 13));
    CHECK(fcntl(mem, F_GET_SEALS) == F_SEAL_SHRINK);
    CHECK(ftruncate(mem, 1) == -1 && errno == EPERM);
    CHECK(links(nl, 2) == 1);
    char text[64] = {0};
    CHECK(pread(status, text, sizeof text - 1, 0) > 0 && !strncmp(text, "Name:", 5));
    DONE();
}
