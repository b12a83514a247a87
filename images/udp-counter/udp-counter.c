/*
 * udp-counter: a tiny UDP server that counts datagrams, as a stand-in for the UDP apps
 * (a DNS server, say) a worker must keep reachable while they are swapped out.
 *
 *   udp-counter [PORT]      (default 53, on 0.0.0.0)
 *
 * Every datagram is answered, to its sender, with "count=N\n", N counting every datagram
 * so far, this one included. The counter lives only in memory, so a snapshot that keeps
 * the app's memory keeps it. SIGTERM (or SIGINT) ends it with status 0.
 */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stopping;
static void on_signal(int sig) { (void)sig; stopping = 1; }

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 53;
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("udp-counter: socket/bind");
        return 1;
    }
    unsigned long long count = 0;
    while (!stopping) {
        char in[2048], out[64];
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(s, in, sizeof in, 0, (struct sockaddr *)&peer, &len);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("udp-counter: recvfrom");
            return 1;
        }
        int m = snprintf(out, sizeof out, "count=%llu\n", ++count);
        sendto(s, out, (size_t)m, 0, (struct sockaddr *)&peer, len);
    }
    return 0;
}
