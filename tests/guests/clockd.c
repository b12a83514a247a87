/* Clocks across a snapshot.
 *   serve PORT   answers each connection with "mono=NS real=NS\n"; writes /tmp/clockd.state
 *   unix PATH    the same on an AF_UNIX socket bound at PATH (a file in a writable directory)
 *   sleep SECS   one nanosleep of SECS seconds, then prints how long it took (monotonic)
 *   spin SECS    reads CLOCK_MONOTONIC (through the vDSO) in a loop for SECS seconds of it,
 *                with no other call; prints how often it went back */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int64_t ns(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec * 1000000000ll + t.tv_nsec;
}

/* Answers every connection on the listening socket `fd` with the clocks. */
static _Noreturn void answer(int fd) {
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        char line[96];
        int n = snprintf(line, sizeof line, "mono=%lld real=%lld\n", (long long)ns(CLOCK_MONOTONIC),
                         (long long)ns(CLOCK_REALTIME));
        write(c, line, n);
        close(c);
    }
}

int main(int argc, char **argv) {
    /* A client that connected and left (a readiness probe) must not end the server. */
    signal(SIGPIPE, SIG_IGN);
    if (argc > 2 && !strcmp(argv[1], "sleep")) {
        int64_t start = ns(CLOCK_MONOTONIC);
        printf("sleeping\n");
        fflush(stdout);
        struct timespec nap = {atoi(argv[2]), 0};
        nanosleep(&nap, NULL);
        printf("elapsed=%lld\n", (long long)(ns(CLOCK_MONOTONIC) - start));
        return 0;
    }
    if (argc > 2 && !strcmp(argv[1], "spin")) {
        int64_t start = ns(CLOCK_MONOTONIC), previous = start, backwards = 0;
        printf("spinning\n");
        fflush(stdout);
        while (previous - start < atoi(argv[2]) * 1000000000ll) {
            int64_t now = ns(CLOCK_MONOTONIC);
            if (now < previous) backwards++;
            previous = now;
        }
        printf("back=%lld\n", (long long)backwards);
        return 0;
    }
    if (argc > 2 && !strcmp(argv[1], "serve")) {
        FILE *state = fopen("/tmp/clockd.state", "w");
        if (state) { fputs("started\n", state); fclose(state); }
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 16)) { perror("bind"); return 1; }
        answer(fd);
    }
    if (argc > 2 && !strcmp(argv[1], "unix")) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1);
        if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 16)) { perror("bind"); return 1; }
        answer(fd);
    }
    fprintf(stderr, "usage: %s serve PORT | unix PATH | sleep SECS\n", argv[0]);
    return 2;
}
