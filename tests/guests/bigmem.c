/* An app with a large memory that serves requests touching a small part of it.
 *   bigmem PORT TOTAL_MIB HOT_MIB
 * fills TOTAL_MIB of memory with non-zero data, then answers HTTP requests:
 *   GET /        reads the first HOT_MIB (one byte per page) and returns a checksum
 *   GET /dirty   writes one byte in each page of the second MiB, returns "dirtied"
 *   GET /drop    drops the second MiB with madvise(MADV_DONTNEED), returns "dropped" */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s PORT TOTAL_MIB HOT_MIB\n", argv[0]); return 2; }
    int port = atoi(argv[1]);
    size_t total = (size_t)atoi(argv[2]) << 20, hot = (size_t)atoi(argv[3]) << 20;
    unsigned char *mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 1; }
    for (size_t i = 0; i < total; i += 64) mem[i] = (unsigned char)(i >> 12) | 1;
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 64)) { perror("bind"); return 1; }
    fprintf(stderr, "bigmem: %zu MiB filled, serving\n", total >> 20);
    unsigned generation = 0;
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        char request[512];
        ssize_t n = read(c, request, sizeof request - 1);
        if (n <= 0) { close(c); continue; }
        request[n] = 0;
        char body[64];
        if (!strncmp(request, "GET /dirty", 10)) {
            generation++;
            for (size_t i = 1 << 20; i < (2u << 20) && i < total; i += 4096) mem[i] = (unsigned char)(generation | 1);
            snprintf(body, sizeof body, "dirtied\n");
        } else if (!strncmp(request, "GET /drop", 9)) {
            if (total >= (2u << 20)) madvise(mem + (1 << 20), 1 << 20, MADV_DONTNEED);
            snprintf(body, sizeof body, "dropped\n");
        } else {
            uint64_t sum = 0;
            for (size_t i = 0; i < hot; i += 4096) sum += mem[i];
            snprintf(body, sizeof body, "sum=%llu\n", (unsigned long long)sum);
        }
        char response[256];
        int len = snprintf(response, sizeof response,
                           "HTTP/1.0 200 OK\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
                           strlen(body), body);
        write(c, response, len);
        close(c);
    }
}
