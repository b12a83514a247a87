/* Networking inside one picoprocess: the app talks to itself over TCP, UDP and AF_UNIX,
 * through the NAT. argv[1] is the app's address; argv[2] another app's address. */
#define _GNU_SOURCE
#include "check.h"
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

static struct sockaddr_in addr_of(const char *ip, int port) {
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    return a;
}

int main(int argc, char **argv) {
    if (argc > 3 && !strcmp(argv[1], "bind")) {
        /* Try to take IP:PORT; report what the VMM said. */
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = addr_of(argv[2], atoi(argv[3]));
        if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0) { printf("bound\n"); return 0; }
        printf("bind failed: %s\n", strerror(errno));
        return errno == EADDRNOTAVAIL ? 3 : 1;
    }
    const char *own = argc > 1 ? argv[1] : "127.0.0.1";
    const char *other = argc > 2 ? argv[2] : "127.0.0.2";
    char buf[256];

    /* A bind to INADDR_ANY lands on the app's address. */
    int srv = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    CHECK(setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0);
    struct sockaddr_in any = addr_of("0.0.0.0", 0);
    CHECK(bind(srv, (struct sockaddr *)&any, sizeof any) == 0);
    CHECK(listen(srv, 16) == 0);
    struct sockaddr_in bound;
    socklen_t len = sizeof bound;
    CHECK(getsockname(srv, (struct sockaddr *)&bound, &len) == 0);
    inet_ntop(AF_INET, &bound.sin_addr, buf, sizeof buf);
    CHECK(strcmp(buf, own) == 0);
    int port = ntohs(bound.sin_port);
    CHECK(port > 0);

    /* Binding or connecting to another app's address is refused. */
    int bad = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in theirs = addr_of(other, 8080);
    CHECK(bind(bad, (struct sockaddr *)&theirs, sizeof theirs) == -1 && errno == EADDRNOTAVAIL);
    CHECK(connect(bad, (struct sockaddr *)&theirs, sizeof theirs) == -1 && errno == ENETUNREACH);
    close(bad);

    /* A non-blocking connect to ourselves, accepted, then data both ways. */
    int cli = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in target = addr_of(own, port);
    int rc = connect(cli, (struct sockaddr *)&target, sizeof target);
    CHECK(rc == 0 || errno == EINPROGRESS);
    struct pollfd pfd = {srv, POLLIN, 0};
    CHECK(poll(&pfd, 1, 2000) == 1 && (pfd.revents & POLLIN));
    struct sockaddr_in peer;
    len = sizeof peer;
    int conn = accept4(srv, (struct sockaddr *)&peer, &len, SOCK_CLOEXEC);
    CHECK(conn >= 0);
    inet_ntop(AF_INET, &peer.sin_addr, buf, sizeof buf);
    CHECK(strcmp(buf, own) == 0); /* the client's source is the app's address too */
    CHECK(setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0);
    int nodelay = 0;
    len = sizeof nodelay;
    CHECK(getsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &nodelay, &len) == 0 && nodelay == 1);
    CHECK(send(cli, "ping", 4, 0) == 4);
    CHECK(recv(conn, buf, sizeof buf, 0) == 4 && memcmp(buf, "ping", 4) == 0);
    CHECK(write(conn, "pong", 4) == 4);
    pfd = (struct pollfd){cli, POLLIN, 0};
    CHECK(poll(&pfd, 1, 2000) == 1);
    CHECK(read(cli, buf, sizeof buf) == 4 && memcmp(buf, "pong", 4) == 0);
    CHECK(recv(cli, buf, sizeof buf, 0) == -1 && errno == EAGAIN);
    int avail = -1;
    CHECK(write(conn, "xyz", 3) == 3);
    usleep(10000);
    CHECK(ioctl(cli, FIONREAD, &avail) == 0 && avail == 3);

    /* epoll sees readiness and returns the app's data. */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0x1122334455667788ull};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, cli, &ev) == 0);
    struct epoll_event out[4];
    CHECK(epoll_wait(ep, out, 4, 1000) == 1 && out[0].data.u64 == 0x1122334455667788ull);
    CHECK(read(cli, buf, 3) == 3);
    CHECK(epoll_wait(ep, out, 4, 50) == 0);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, cli, NULL) == 0);

    /* sendmsg/recvmsg with two iovecs; shutdown gives EOF. */
    struct iovec iov[2] = {{"ab", 2}, {"cd", 2}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    CHECK(sendmsg(conn, &msg, 0) == 4);
    char r1[1], r2[8];
    struct iovec riov[2] = {{r1, 1}, {r2, 8}};
    struct msghdr rmsg = {.msg_iov = riov, .msg_iovlen = 2};
    pfd = (struct pollfd){cli, POLLIN, 0};
    poll(&pfd, 1, 1000);
    CHECK(recvmsg(cli, &rmsg, 0) == 4 && r1[0] == 'a' && memcmp(r2, "bcd", 3) == 0);
    CHECK(shutdown(conn, SHUT_WR) == 0);
    poll(&pfd, 1, 1000);
    CHECK(read(cli, buf, sizeof buf) == 0);
    close(conn);
    close(cli);

    /* UDP to ourselves. */
    int u1 = socket(AF_INET, SOCK_DGRAM, 0), u2 = socket(AF_INET, SOCK_DGRAM, 0);
    CHECK(bind(u1, (struct sockaddr *)&any, sizeof any) == 0);
    len = sizeof bound;
    getsockname(u1, (struct sockaddr *)&bound, &len);
    struct sockaddr_in udp_target = addr_of(own, ntohs(bound.sin_port));
    CHECK(sendto(u2, "datagram", 8, 0, (struct sockaddr *)&udp_target, sizeof udp_target) == 8);
    len = sizeof peer;
    CHECK(recvfrom(u1, buf, sizeof buf, 0, (struct sockaddr *)&peer, &len) == 8 && memcmp(buf, "datagram", 8) == 0);
    inet_ntop(AF_INET, &peer.sin_addr, buf, sizeof buf);
    CHECK(strcmp(buf, own) == 0);

    /* AF_UNIX inside the root's writable /tmp, and socketpair. */
    int us = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un ua = {.sun_family = AF_UNIX};
    strcpy(ua.sun_path, "/tmp/app.sock");
    CHECK(bind(us, (struct sockaddr *)&ua, sizeof ua) == 0);
    CHECK(listen(us, 4) == 0);
    int uc = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(connect(uc, (struct sockaddr *)&ua, sizeof ua) == 0);
    int ua_conn = accept(us, NULL, NULL);
    CHECK(ua_conn >= 0 && write(uc, "unix", 4) == 4 && read(ua_conn, buf, 4) == 4);
    struct sockaddr_un got = {0};
    len = sizeof got;
    CHECK(getsockname(us, (struct sockaddr *)&got, &len) == 0 && strcmp(got.sun_path, "/tmp/app.sock") == 0);
    strcpy(ua.sun_path, "/not-writable.sock");
    int ro = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(bind(ro, (struct sockaddr *)&ua, sizeof ua) == -1 && errno == EROFS);
    int sp[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0 && write(sp[0], "sp", 2) == 2 && read(sp[1], buf, 2) == 2);

    /* eventfd, timerfd, select. */
    int efd = eventfd(3, EFD_CLOEXEC);
    uint64_t counter = 0;
    CHECK(read(efd, &counter, 8) == 8 && counter == 3);
    CHECK(eventfd_write(efd, 5) == 0 && read(efd, &counter, 8) == 8 && counter == 5);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    struct itimerspec its = {.it_value = {0, 30 * 1000 * 1000}};
    CHECK(timerfd_settime(tfd, 0, &its, NULL) == 0);
    struct itimerspec cur;
    CHECK(timerfd_gettime(tfd, &cur) == 0 && cur.it_value.tv_nsec > 0);
    fd_set rfds;
    FD_ZERO(&rfds);
    FD_SET(tfd, &rfds);
    struct timeval tv = {2, 0};
    CHECK(select(tfd + 1, &rfds, NULL, NULL, &tv) == 1 && FD_ISSET(tfd, &rfds));
    uint64_t expirations = 0;
    CHECK(read(tfd, &expirations, 8) == 8 && expirations == 1);
    int fl = fcntl(efd, F_GETFL);
    CHECK(fcntl(efd, F_SETFL, fl | O_NONBLOCK) == 0 && (fcntl(efd, F_GETFL) & O_NONBLOCK));
    CHECK(read(efd, &counter, 8) == -1 && errno == EAGAIN);

    DONE();
}
