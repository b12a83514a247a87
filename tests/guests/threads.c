/* Threads inside a picoprocess: pthread_create/join (clone3 or clone), mutexes, condition
 * variables, barriers, thread-local storage, gettid, pthread_kill, cancellation,
 * detached threads, a futex ping-pong, timed waits, and a thread's exit beside
 * exit_group. Prints PASSED when every check holds. */
#define _GNU_SOURCE
#include "check.h"
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <sys/wait.h>

#define THREADS 8
#define ROUNDS 2000

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static pthread_barrier_t barrier;
static long counter;
static int turn;
static __thread int tls_value;
static pid_t tids[THREADS];

static void *worker(void *arg) {
    long id = (long)arg;
    tls_value = (int)id * 10;
    tids[id] = syscall(SYS_gettid);
    pthread_barrier_wait(&barrier);
    for (int i = 0; i < ROUNDS; i++) {
        pthread_mutex_lock(&lock);
        counter++;
        pthread_mutex_unlock(&lock);
        if (i % 500 == 0) sched_yield();
    }
    /* Take turns in order through a condition variable. */
    pthread_mutex_lock(&lock);
    while (turn != id) pthread_cond_wait(&cond, &lock);
    turn++;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    /* Each thread kept its own TLS while the others ran. */
    return (void *)(long)(tls_value == (int)id * 10);
}

static volatile sig_atomic_t usr1_tid;
static void on_usr1(int sig) { (void)sig; usr1_tid = syscall(SYS_gettid); }

static void *sleeper(void *arg) {
    (void)arg;
    *(pid_t *)arg = syscall(SYS_gettid);
    for (int i = 0; i < 200 && !usr1_tid; i++) usleep(5000);
    return NULL;
}

static void *cancellable(void *arg) {
    (void)arg;
    for (;;) pause(); /* a cancellation point */
    return NULL;
}

static atomic_int ping_word;
static long futex(atomic_int *addr, int op, int val, const struct timespec *t) {
    return syscall(SYS_futex, addr, op, val, t, NULL, 0);
}
static void *ponger(void *arg) {
    (void)arg;
    for (int i = 0; i < 200; i++) {
        while (atomic_load(&ping_word) != 1) futex(&ping_word, FUTEX_WAIT_PRIVATE, 0, NULL);
        atomic_store(&ping_word, 0);
        futex(&ping_word, FUTEX_WAKE_PRIVATE, 1, NULL);
    }
    return NULL;
}

static atomic_int detached_done;
static void *detached(void *arg) {
    (void)arg;
    atomic_store(&detached_done, 1);
    futex(&detached_done, FUTEX_WAKE_PRIVATE, 1, NULL);
    return NULL;
}

static void *exits_alone(void *arg) {
    (void)arg;
    syscall(SYS_exit, 0); /* this thread only */
    return NULL;
}

static void *spinner(void *arg) {
    /* Never makes a call: only the time slice lets the main thread go on. */
    while (!atomic_load((atomic_int *)arg)) {}
    return NULL;
}

/* "unmap-across": thread B reads a page, thread A unmaps it, B reads it again and must
 * die of SIGSEGV (the translation B used is gone for B too). */
static volatile char *shared_page;
static atomic_int phase;
static void *reader(void *arg) {
    (void)arg;
    char seen = shared_page[0];
    atomic_store(&phase, 1);
    while (atomic_load(&phase) != 2) sched_yield();
    printf("read %d before, now reading the unmapped page\n", seen);
    fflush(stdout);
    return (void *)(long)shared_page[0];
}
static int unmap_across(void) {
    shared_page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    shared_page[0] = 42;
    pthread_t b;
    pthread_create(&b, NULL, reader, NULL);
    while (atomic_load(&phase) != 1) sched_yield();
    munmap((void *)shared_page, 4096);
    atomic_store(&phase, 2);
    pthread_join(b, NULL);
    printf("the reader survived\n");
    return 0;
}

/* Clocks agree across threads (and so across vCPUs): a time one thread read and handed
 * over is never later than what the other reads next. */
static atomic_long handed_time;
static atomic_int clock_turn;
static long monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}
#define CLOCK_ROUNDS 200
static void *clock_partner(void *arg) {
    long *backwards = arg;
    for (int i = 0; i < CLOCK_ROUNDS; i++) {
        while (atomic_load(&clock_turn) != 2 * i + 1) sched_yield();
        if (monotonic_ns() < atomic_load(&handed_time)) (*backwards)++;
        atomic_store(&handed_time, monotonic_ns());
        atomic_store(&clock_turn, 2 * i + 2);
    }
    return NULL;
}

/* "latency": while another thread computes without a call, this one sleeps 1 ms 50
 * times; prints how long that took. Threads sharing one vCPU wait for each other's time
 * slices; threads on vCPUs of their own do not. */
static int sleep_beside_a_spinner(void) {
    atomic_int stop = 0;
    pthread_t t;
    pthread_create(&t, NULL, spinner, &stop);
    struct timespec one_ms = {0, 1000000};
    long started = monotonic_ns();
    for (int i = 0; i < 50; i++) nanosleep(&one_ms, NULL);
    long took = (monotonic_ns() - started) / 1000000;
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    printf("slept 50 x 1 ms in %ld ms\n", took);
    return 0;
}

/* "own-calls [ROUNDS]": threads on vCPUs of their own make calls the mailbox answers (the poller
 * serves every vCPU's mailbox) while the main thread signals them. Each call must act as
 * the thread that made it: its own signal mask, robust list and file offset, and each
 * signal must reach the thread it was sent to. */
#define OWN_THREADS 3
static int own_rounds = 3000;
static atomic_int own_failures, own_running;
static __thread pid_t own_tid;
static atomic_int misdelivered, delivered;
static void on_own_signal(int sig) {
    (void)sig;
    atomic_fetch_add(&delivered, 1);
    /* A thread is signalled from its start; it knows its tid a little later. */
    if (own_tid && syscall(SYS_gettid) != own_tid) atomic_fetch_add(&misdelivered, 1);
}
static const char *own_program;
static pid_t own_ppid;
#define OWN_CHECK(cond) do { if (!(cond)) { atomic_fetch_add(&own_failures, 1); \
    printf("FAIL thread %ld round %d: %s\n", id, i, #cond); } } while (0)
static void *own_calls(void *arg) {
    long id = (long)arg;
    own_tid = syscall(SYS_gettid);
    int fd = open(own_program, O_RDONLY);
    long robust[3] = {0};
    for (int i = 0; i < own_rounds && atomic_load(&own_failures) < 10; i++) {
        sigset_t mine, got;
        sigemptyset(&mine);
        sigaddset(&mine, SIGRTMIN + 1 + (int)id);
        OWN_CHECK(pthread_sigmask(SIG_SETMASK, &mine, NULL) == 0);
        OWN_CHECK(pthread_sigmask(SIG_SETMASK, NULL, &got) == 0);
        OWN_CHECK(sigismember(&got, SIGRTMIN + 1 + (int)id) == 1);
        for (long other = 0; other < OWN_THREADS; other++)
            if (other != id) OWN_CHECK(sigismember(&got, SIGRTMIN + 1 + (int)other) == 0);
        OWN_CHECK(syscall(SYS_set_robust_list, &robust[id % 3], 24) == 0);
        void *head = NULL;
        size_t len = 0;
        OWN_CHECK(syscall(SYS_get_robust_list, 0, &head, &len) == 0);
        OWN_CHECK(head == &robust[id % 3] && len == 24);
        off_t at = id * 100000 + i;
        OWN_CHECK(lseek(fd, at, SEEK_SET) == at);
        OWN_CHECK(lseek(fd, 0, SEEK_CUR) == at);
        OWN_CHECK(getppid() == own_ppid);
    }
    close(fd);
    atomic_fetch_sub(&own_running, 1);
    return NULL;
}
static int calls_as_their_own_thread(const char *program) {
    own_program = program;
    own_ppid = getppid();
    signal(SIGUSR1, on_own_signal);
    own_tid = syscall(SYS_gettid);
    pthread_t t[OWN_THREADS];
    atomic_store(&own_running, OWN_THREADS);
    for (long id = 0; id < OWN_THREADS; id++) pthread_create(&t[id], NULL, own_calls, (void *)id);
    struct timespec pause_ms = {0, 1000000};
    int sent = 0;
    while (atomic_load(&own_running) > 0) {
        for (int id = 0; id < OWN_THREADS; id++)
            if (pthread_kill(t[id], SIGUSR1) == 0) sent++;
        nanosleep(&pause_ms, NULL);
    }
    for (int id = 0; id < OWN_THREADS; id++) pthread_join(t[id], NULL);
    int failures = atomic_load(&own_failures) + atomic_load(&misdelivered);
    printf("own-calls: %s: %d failures, %d signals sent, %d misdelivered\n",
           failures ? "FAILED" : "PASSED", failures, sent, atomic_load(&misdelivered));
    return failures ? 1 : 0;
}

/* "parallel-reads": large reads of a file from one thread, then from two at once; prints
 * both times. On Linux, and in a picoprocess whose VMM makes such transfers without its
 * process lock, two threads take about as long as one on two cores; serialized, twice as
 * long. Every byte read is checked. */
#define FILE_MIB 16
#define CHUNK (4 << 20)
#define PASSES 6
static const char *big_file = "/tmp/parallel-reads";
static atomic_int read_failures;
static char pattern_at(long offset) { return (char)(offset * 7 + offset / 4096); }
static void *read_file_again_and_again(void *arg) {
    (void)arg;
    char *buf = malloc(CHUNK);
    int fd = open(big_file, O_RDONLY);
    for (int pass = 0; pass < PASSES; pass++)
        for (long at = 0; at < (long)FILE_MIB << 20; at += CHUNK) {
            if (pread(fd, buf, CHUNK, at) != CHUNK) {
                atomic_fetch_add(&read_failures, 1);
                continue;
            }
            for (long i = 0; i < CHUNK; i += 4093)
                if (buf[i] != pattern_at(at + i)) atomic_fetch_add(&read_failures, 1);
        }
    close(fd);
    free(buf);
    return NULL;
}
static void *write_half(void *arg) {
    long half = (long)arg, size = (long)FILE_MIB << 19;
    char *buf = malloc(CHUNK);
    int fd = open(big_file, O_WRONLY);
    for (long at = half * size; at < (half + 1) * size; at += CHUNK) {
        for (long i = 0; i < CHUNK; i++) buf[i] = (char)~pattern_at(at + i);
        if (pwrite(fd, buf, CHUNK, at) != CHUNK) atomic_fetch_add(&read_failures, 1);
    }
    close(fd);
    free(buf);
    return NULL;
}
static long readers_take_ms(int readers) {
    pthread_t t[2];
    long started = monotonic_ns();
    for (int i = 0; i < readers; i++) pthread_create(&t[i], NULL, read_file_again_and_again, NULL);
    for (int i = 0; i < readers; i++) pthread_join(t[i], NULL);
    return (monotonic_ns() - started) / 1000000;
}
static int parallel_reads(void) {
    char *buf = malloc(CHUNK);
    int fd = open(big_file, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0);
    for (long at = 0; at < (long)FILE_MIB << 20; at += CHUNK) {
        for (long i = 0; i < CHUNK; i++) buf[i] = pattern_at(at + i);
        CHECK(write(fd, buf, CHUNK) == CHUNK);
    }
    close(fd);
    free(buf);
    /* The first pass warms the page cache and makes the vCPUs. */
    readers_take_ms(2);
    long one = readers_take_ms(1), two = readers_take_ms(2);
    /* Two threads write halves of the file at once; every byte must land. */
    pthread_t writers[2];
    for (long half = 0; half < 2; half++)
        pthread_create(&writers[half], NULL, write_half, (void *)half);
    for (int half = 0; half < 2; half++) pthread_join(writers[half], NULL);
    fd = open(big_file, O_RDONLY);
    buf = malloc(CHUNK);
    for (long at = 0; at < (long)FILE_MIB << 20; at += CHUNK) {
        CHECK(pread(fd, buf, CHUNK, at) == CHUNK);
        for (long i = 0; i < CHUNK; i += 4093)
            if (buf[i] != (char)~pattern_at(at + i)) { failures++; break; }
    }
    free(buf);
    close(fd);
    unlink(big_file);
    failures += atomic_load(&read_failures);
    printf("parallel-reads: %s: %d failures, one thread %ld ms, two threads %ld ms\n",
           failures ? "FAILED" : "PASSED", failures, one, two);
    return failures ? 1 : 0;
}

/* "unmap-during-read": a thread reads 4 MiB of a file into a buffer while another unmaps
 * that buffer, maps new memory and fills it. The read may land in the old pages or fail,
 * but never in the new memory: a VMM that makes the transfer without its lock must not
 * give the buffer's frames to another mapping before the transfer is over. */
#define UNMAP_ROUNDS 30
static char *volatile read_target;
static atomic_int unmap_phase, reader_started;
static void *read_into_target(void *arg) {
    int fd = *(int *)arg;
    for (int round = 0; round < UNMAP_ROUNDS; round++) {
        while (atomic_load(&unmap_phase) != 2 * round + 1) sched_yield();
        atomic_store(&reader_started, 1);
        (void)!pread(fd, read_target, CHUNK, 0);
        atomic_store(&unmap_phase, 2 * round + 2);
    }
    return NULL;
}
static int unmap_during_read(void) {
    char *buf = malloc(CHUNK);
    int fd = open(big_file, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0);
    memset(buf, 0x11, CHUNK);
    CHECK(write(fd, buf, CHUNK) == CHUNK);
    free(buf);
    pthread_t reader;
    pthread_create(&reader, NULL, read_into_target, &fd);
    int corrupted = 0;
    /* The buffer and the new memory each have addresses of their own: a read that starts
     * late (the reader lost its core) finds no buffer, never the new memory. */
    char *area = mmap(NULL, 2 * CHUNK, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *fixed[2] = {area, area + CHUNK};
    int rw = PROT_READ | PROT_WRITE, anon_fixed = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED;
    for (int round = 0; round < UNMAP_ROUNDS; round++) {
        char *old = mmap(fixed[0], CHUNK, rw, anon_fixed, -1, 0);
        memset(old, 0, CHUNK);
        read_target = old;
        atomic_store(&reader_started, 0);
        atomic_store(&unmap_phase, 2 * round + 1);
        while (!atomic_load(&reader_started)) {}
        /* Into the transfer: past the call's entry, well before its 4 MiB are copied. */
        long started = monotonic_ns();
        while (monotonic_ns() - started < 150000) {}
        munmap(old, CHUNK);
        char *fresh = mmap(fixed[1], CHUNK, rw, anon_fixed, -1, 0);
        memset(fresh, 0x5a, CHUNK);
        while (atomic_load(&unmap_phase) != 2 * round + 2) sched_yield();
        for (long i = 0; i < CHUNK; i += 512)
            if (fresh[i] != 0x5a) { corrupted++; break; }
        mmap(fresh, CHUNK, PROT_NONE, anon_fixed, -1, 0);
    }
    pthread_join(reader, NULL);
    close(fd);
    unlink(big_file);
    failures += corrupted;
    printf("unmap-during-read: %s: %d failures, %d of %d rounds corrupted new memory\n",
           failures ? "FAILED" : "PASSED", failures, corrupted, UNMAP_ROUNDS);
    return failures ? 1 : 0;
}

/* "map-beside-a-spinner": one thread maps and fills 200 new areas while another computes
 * on a vCPU of its own. New mappings fill only empty page-table entries: the VMM need not
 * bring the other vCPU out of its guest for them (it must for the unmaps at the end). */
static int map_beside_a_spinner(void) {
    atomic_int stop = 0;
    pthread_t t;
    pthread_create(&t, NULL, spinner, &stop);
    char *areas[200];
    for (int i = 0; i < 200; i++) {
        areas[i] = mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CHECK(areas[i] != MAP_FAILED);
        memset(areas[i], i, 65536);
    }
    for (int i = 0; i < 200; i++) CHECK(areas[i][65535] == (char)i);
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    DONE();
}

/* "fork-beside-a-thread": forks while a second thread waits on its own vCPU; the child
 * says "forked" and waits until stdin ends, so that the test can look at the forked
 * VMM's host fds meanwhile. */
static int wait_fds[2];
static void *wait_on_pipe(void *arg) {
    (void)arg;
    char byte;
    return (void *)(long)read(wait_fds[0], &byte, 1);
}
static int fork_beside_a_thread(void) {
    CHECK(pipe(wait_fds) == 0);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, wait_on_pipe, NULL) == 0);
    usleep(100 * 1000); /* the thread waits in its read, on its own vCPU */
    pid_t child = fork();
    if (child == 0) {
        printf("forked\n");
        fflush(stdout);
        char byte;
        while (read(0, &byte, 1) > 0) {
        }
        _exit(0);
    }
    CHECK(child > 0);
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(write(wait_fds[1], "x", 1) == 1);
    CHECK(pthread_join(t, NULL) == 0);
    DONE();
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "fork-beside-a-thread") == 0) return fork_beside_a_thread();
    if (argc > 1 && strcmp(argv[1], "parallel-reads") == 0) return parallel_reads();
    if (argc > 1 && strcmp(argv[1], "map-beside-a-spinner") == 0) return map_beside_a_spinner();
    if (argc > 1 && strcmp(argv[1], "unmap-during-read") == 0) return unmap_during_read();
    if (argc > 1 && strcmp(argv[1], "own-calls") == 0) {
        if (argc > 2) own_rounds = atoi(argv[2]); /* fewer under emulation */
        return calls_as_their_own_thread(argv[0]);
    }
    if (argc > 1 && strcmp(argv[1], "unmap-across") == 0) return unmap_across();
    if (argc > 1 && strcmp(argv[1], "latency") == 0) return sleep_beside_a_spinner();
    pthread_t threads[THREADS];
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t main_tid = syscall(SYS_gettid);
    CHECK(main_tid == getpid());
    CHECK(pthread_barrier_init(&barrier, NULL, THREADS) == 0);
    if (getenv("STEPS")) printf("step: workers\n");
    for (long i = 0; i < THREADS; i++)
        CHECK(pthread_create(&threads[i], NULL, worker, (void *)i) == 0);
    for (int i = 0; i < THREADS; i++) {
        void *ok = NULL;
        CHECK(pthread_join(threads[i], &ok) == 0);
        CHECK(ok == (void *)1);
    }
    CHECK(counter == (long)THREADS * ROUNDS);
    CHECK(turn == THREADS);
    for (int i = 0; i < THREADS; i++) {
        CHECK(tids[i] > 0 && tids[i] != main_tid);
        for (int j = 0; j < i; j++) CHECK(tids[i] != tids[j]);
    }

    /* pthread_kill reaches the thread it names. */
    signal(SIGUSR1, on_usr1);
    pthread_t t;
    pid_t sleeper_tid = 0;
    CHECK(pthread_create(&t, NULL, sleeper, &sleeper_tid) == 0);
    while (!__atomic_load_n(&sleeper_tid, __ATOMIC_SEQ_CST)) sched_yield();
    CHECK(pthread_kill(t, SIGUSR1) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(usr1_tid == sleeper_tid);

    /* Cancellation of a thread blocked in pause(). */
    CHECK(pthread_create(&t, NULL, cancellable, NULL) == 0);
    usleep(20000);
    CHECK(pthread_cancel(t) == 0);
    void *result = NULL;
    CHECK(pthread_join(t, &result) == 0);
    CHECK(result == PTHREAD_CANCELED);

    /* Futex ping-pong between two threads. */
    CHECK(pthread_create(&t, NULL, ponger, NULL) == 0);
    for (int i = 0; i < 200; i++) {
        atomic_store(&ping_word, 1);
        futex(&ping_word, FUTEX_WAKE_PRIVATE, 1, NULL);
        while (atomic_load(&ping_word) != 0) futex(&ping_word, FUTEX_WAIT_PRIVATE, 1, NULL);
    }
    CHECK(pthread_join(t, NULL) == 0);

    /* A timed futex wait times out while another thread exists. */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    atomic_int never = 0;
    atomic_int stop_spinning = 0;
    CHECK(pthread_create(&t, &attr, spinner, &stop_spinning) == 0);
    struct timespec timeout = {0, 30 * 1000 * 1000}, before, after;
    clock_gettime(CLOCK_MONOTONIC, &before);
    CHECK(futex(&never, FUTEX_WAIT_PRIVATE, 0, &timeout) == -1 && errno == ETIMEDOUT);
    clock_gettime(CLOCK_MONOTONIC, &after);
    long waited_ms = (after.tv_sec - before.tv_sec) * 1000 + (after.tv_nsec - before.tv_nsec) / 1000000;
    CHECK(waited_ms >= 29 && waited_ms < 2000);
    atomic_store(&stop_spinning, 1);

    /* A detached thread runs and wakes us. */
    CHECK(pthread_create(&t, &attr, detached, NULL) == 0);
    while (!atomic_load(&detached_done)) futex(&detached_done, FUTEX_WAIT_PRIVATE, 0, NULL);

    /* A thread's exit ends only that thread; join sees it (CLONE_CHILD_CLEARTID). */
    CHECK(pthread_create(&t, NULL, exits_alone, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);

    /* Time handed from thread to thread never goes backwards. */
    long backwards = 0;
    CHECK(pthread_create(&t, NULL, clock_partner, &backwards) == 0);
    for (int i = 0; i < CLOCK_ROUNDS; i++) {
        atomic_store(&handed_time, monotonic_ns());
        atomic_store(&clock_turn, 2 * i + 1);
        while (atomic_load(&clock_turn) != 2 * i + 2) sched_yield();
        if (monotonic_ns() < atomic_load(&handed_time)) backwards++;
    }
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(backwards == 0);

    /* The CPU count the app sees matches its affinity. */
    cpu_set_t set;
    CHECK(sched_getaffinity(0, sizeof set, &set) == 0);
    CHECK(CPU_COUNT(&set) == sysconf(_SC_NPROCESSORS_ONLN) || sysconf(_SC_NPROCESSORS_ONLN) < 1);

    if (argc > 1 && strcmp(argv[1], "exit-from-thread") == 0) {
        /* exit_group from a second thread ends the app with its status. */
        printf("PASSED before exit\n");
        fflush(stdout);
        CHECK(pthread_create(&t, NULL, (void *(*)(void *))exit, (void *)7L) == 0);
        for (;;) pause();
    }
    DONE();
}
