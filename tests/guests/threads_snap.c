/* A threaded app that lives through snapshots: workers take a mutex, count, signal a
 * condition variable and sleep; one thread waits on a condition variable until the end;
 * one waits with a timeout, over and over. After SECONDS (argv[1]) of its own time the
 * main thread stops them all and checks that every count adds up and that each thread
 * kept its tid and TLS. Prints "ready" once running and PASSED at the end. */
#define _GNU_SOURCE
#include "check.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 4

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static long total, counts[WORKERS], timeouts;
static atomic_int done;
static __thread long tls_id = -1;
static int bad_tid, bad_tls;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *worker(void *arg) {
    long id = (long)arg;
    tls_id = id;
    pid_t tid = syscall(SYS_gettid);
    while (!atomic_load(&done)) {
        pthread_mutex_lock(&lock);
        total++;
        counts[id]++;
        pthread_cond_broadcast(&changed);
        pthread_mutex_unlock(&lock);
        usleep(200 + 100 * id);
        if (syscall(SYS_gettid) != tid) bad_tid++;
        if (tls_id != id) bad_tls++;
    }
    return NULL;
}

static void *waiter(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    while (!atomic_load(&done)) pthread_cond_wait(&changed, &lock);
    pthread_mutex_unlock(&lock);
    return (void *)1;
}

static void *timed(void *arg) {
    (void)arg;
    pthread_mutex_t mine = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t never = PTHREAD_COND_INITIALIZER;
    pthread_mutex_lock(&mine);
    while (!atomic_load(&done)) {
        struct timespec at;
        clock_gettime(CLOCK_REALTIME, &at);
        at.tv_nsec += 50 * 1000 * 1000;
        if (at.tv_nsec >= 1000000000) { at.tv_sec++; at.tv_nsec -= 1000000000; }
        if (pthread_cond_timedwait(&never, &mine, &at) == ETIMEDOUT) timeouts++;
    }
    pthread_mutex_unlock(&mine);
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    double seconds = argc > 1 ? atof(argv[1]) : 2;
    pthread_t workers[WORKERS], w, t;
    for (long i = 0; i < WORKERS; i++) CHECK(pthread_create(&workers[i], NULL, worker, (void *)i) == 0);
    CHECK(pthread_create(&w, NULL, waiter, NULL) == 0);
    CHECK(pthread_create(&t, NULL, timed, NULL) == 0);
    printf("ready\n");
    double start = now();
    while (now() - start < seconds) usleep(10000);
    atomic_store(&done, 1);
    pthread_mutex_lock(&lock);
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
    long sum = 0;
    for (int i = 0; i < WORKERS; i++) {
        CHECK(pthread_join(workers[i], NULL) == 0);
        CHECK(counts[i] > 10);
        sum += counts[i];
    }
    void *waited = NULL;
    CHECK(pthread_join(w, &waited) == 0 && waited == (void *)1);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(sum == total);
    CHECK(timeouts >= (long)(seconds * 5));
    CHECK(bad_tid == 0 && bad_tls == 0);
    printf("total %ld timeouts %ld\n", total, timeouts);
    DONE();
}
