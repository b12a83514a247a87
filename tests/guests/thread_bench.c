/* Thread costs, for benches/threads.rs:
 *   create N     N pthread_create + pthread_join pairs, one after another
 *   pingpong N   N futex round trips between two threads (wake the other, wait for it)
 *   parallel N   two threads that each compute N million steps, no call in between
 * Prints the median ns per pair or round trip (for parallel: the ns until both are
 * done), each timed with CLOCK_MONOTONIC. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    } else {
        return 2;
    }
    qsort(times, n, sizeof *times, compare);
    printf("%lld\n", (long long)times[n / 2]);
    return 0;
}
