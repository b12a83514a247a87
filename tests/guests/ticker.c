/* An app that wakes by itself: it waits for connections with a 3 s timeout and counts the
 * timeouts. GET / answers "ticks=N". Frozen in cold storage, it only ticks on if the worker
 * brings it back at its deadline. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(80)};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 16)) { perror("bind"); return 1; }
    unsigned ticks = 0;
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int n = poll(&p, 1, 3000);
        if (n == 0) { ticks++; continue; }
        if (n < 0) continue;
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        char request[512];
        if (read(c, request, sizeof request) > 0) {
            char response[128];
            char body[32];
            snprintf(body, sizeof body, "ticks=%u\n", ticks);
            int len = snprintf(response, sizeof response,
                               "HTTP/1.0 200 OK\r\nContent-Length: %zu\r\n\r\n%s", strlen(body), body);
            write(c, response, len);
        }
        close(c);
    }
}
