/* Localhost is the app's own, and private: a socket bound to 127.0.0.1 says so, takes the
 * app's own connections and datagrams, and nobody else's.
 *
 *   localhost SECONDS   binds TCP and UDP sockets on 127.0.0.1, prints "port P" (the
 *                       same port for both), talks to itself through them, then for
 *                       SECONDS takes whatever else arrives and prints how much did. */
#define _GNU_SOURCE
#include "check.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1;
    struct sockaddr_in lo = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int tcp = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK(bind(tcp, (struct sockaddr *)&lo, sizeof lo) == 0 && listen(tcp, 8) == 0);
    socklen_t len = sizeof lo;
    CHECK(getsockname(tcp, (struct sockaddr *)&lo, &len) == 0);
    CHECK(lo.sin_addr.s_addr == htonl(INADDR_LOOPBACK) && lo.sin_port != 0);
    int udp = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    CHECK(bind(udp, (struct sockaddr *)&lo, sizeof lo) == 0);
    printf("port %d\n", ntohs(lo.sin_port));
    fflush(stdout);

    /* The app's own connection and datagram get through. */
    int c = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(c, (struct sockaddr *)&lo, sizeof lo) == 0);
    struct pollfd p = {.fd = tcp, .events = POLLIN};
    CHECK(poll(&p, 1, 5000) == 1);
    int s = accept(tcp, NULL, NULL);
    char buf[16];
    CHECK(s >= 0 && write(c, "me", 2) == 2 && read(s, buf, sizeof buf) == 2);
    close(s);
    close(c);
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    CHECK(sendto(u, "me", 2, 0, (struct sockaddr *)&lo, sizeof lo) == 2);
    p.fd = udp;
    CHECK(poll(&p, 1, 5000) == 1 && recv(udp, buf, sizeof buf, 0) == 2);
    close(u);

    /* Whatever else arrives is not the app's. */
    int outsiders = 0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        struct pollfd both[2] = {{.fd = tcp, .events = POLLIN}, {.fd = udp, .events = POLLIN}};
        poll(both, 2, 100);
        int other = accept(tcp, NULL, NULL);
        if (other >= 0) {
            outsiders++;
            close(other);
        }
        if (recv(udp, buf, sizeof buf, 0) >= 0) outsiders++;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while (now.tv_sec - start.tv_sec + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    printf("outsiders=%d\n", outsiders);
    CHECK(outsiders == 0);
    DONE();
}
