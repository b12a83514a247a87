/* Thread costs, for benches/threads.rs:
 *   create N     N pthread_create + pthread_join pairs, one after another
 *   pingpong N   N futex round trips between two threads (wake the other, wait for it)
 *   parallel N   two threads that each compute N million steps, no call in between
 *   calls N      one thread makes N rounds of small calls the VMM performs (getppid,
 *                open + close, a UDP send), then two threads at once each make N
 * Prints the median ns per pair or round trip (for parallel: the ns until both are
 * done; for calls: the two threads' time over the one thread's, then the ns a round
 * of the two together), each timed with CLOCK_MONOTONIC. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int64_t now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000ll + t.tv_nsec;
}

static int compare(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void *nothing(void *arg) { return arg; }

static void *compute(void *arg) {
    volatile uint64_t x = 1;
    for (long i = 0; i < (long)(intptr_t)arg * 1000000; i++) x = x * 6364136223846793005ull + 1;
    return NULL;
}

static atomic_int word;
static long rounds;
static void futex_wait(int value) { syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0); }
static void futex_wake(void) { syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0); }

static void *ponger(void *arg) {
    (void)arg;
    for (long i = 0; i < rounds; i++) {
        while (atomic_load(&word) != 1) futex_wait(0);
        atomic_store(&word, 0);
        futex_wake();
    }
    return NULL;
}

static long call_rounds;
static atomic_int call_failures;
static void *small_calls(void *arg) {
    (void)arg;
    int udp = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(9)};
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    char byte = 0;
    for (long i = 0; i < call_rounds; i++) {
        int fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0 || close(fd) || syscall(SYS_getppid) < 0 ||
            sendto(udp, &byte, 1, 0, (struct sockaddr *)&to, sizeof to) != 1)
            atomic_fetch_add(&call_failures, 1);
    }
    close(udp);
    return NULL;
}
static int64_t callers_take_ns(int callers) {
    pthread_t t[2];
    int64_t start = now();
    for (int i = 0; i < callers; i++) pthread_create(&t[i], NULL, small_calls, NULL);
    for (int i = 0; i < callers; i++) pthread_join(t[i], NULL);
    return now() - start;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s create|pingpong N\n", argv[0]); return 2; }
    long n = atol(argv[2]);
    if (n < 1) return 2;
    int64_t *times = calloc(n, sizeof *times);
    if (!strcmp(argv[1], "create")) {
        for (long i = 0; i < n; i++) {
            pthread_t t;
            int64_t start = now();
            if (pthread_create(&t, NULL, nothing, NULL) || pthread_join(t, NULL)) return 1;
            times[i] = now() - start;
        }
    } else if (!strcmp(argv[1], "pingpong")) {
        rounds = n;
        pthread_t t;
        if (pthread_create(&t, NULL, ponger, NULL)) return 1;
        for (long i = 0; i < n; i++) {
            int64_t start = now();
            atomic_store(&word, 1);
            futex_wake();
            while (atomic_load(&word) != 0) futex_wait(1);
            times[i] = now() - start;
        }
        pthread_join(t, NULL);
    } else if (!strcmp(argv[1], "parallel")) {
        pthread_t a, b;
        int64_t start = now();
        if (pthread_create(&a, NULL, compute, (void *)(intptr_t)n) ||
            pthread_create(&b, NULL, compute, (void *)(intptr_t)n))
            return 1;
        pthread_join(a, NULL);
        pthread_join(b, NULL);
        printf("%lld\n", (long long)(now() - start));
        return 0;
    } else if (!strcmp(argv[1], "calls")) {
        call_rounds = n;
        callers_take_ns(2); /* makes the vCPUs */
        int64_t one = callers_take_ns(1), two = callers_take_ns(2);
        if (atomic_load(&call_failures)) return 1;
        /* and the ns per round of the two threads together (4 calls a round) */
        printf("%.3f %.0f\n", (double)two / (double)one, (double)two / (2.0 * n));
        return 0;
    } else {
        return 2;
    }
    qsort(times, n, sizeof *times, compare);
    printf("%lld\n", (long long)times[n / 2]);
    return 0;
}
