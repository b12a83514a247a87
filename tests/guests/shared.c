/* Memory shared between processes: MAP_SHARED anonymous memory, file and memfd mappings
 * that reach the file, POSIX semaphores (sem_open, in /dev/shm) and process-shared
 * pthread mutexes and condition variables waited on across processes, SIGBUS past the
 * end of a shared file mapping, a call given a page whose file shrank under it, and a
 * robust mutex whose holder process died. Passes
 * natively too. Needs writable /tmp and /dev/shm. */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int child_status(pid_t pid) {
    int status = -1;
    if (waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* A child's write to shared anonymous memory is the parent's, both ways. */
static void anonymous_memory_is_shared_with_a_child(void) {
    volatile uint32_t *shared = mmap(NULL, 8192, PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(shared != MAP_FAILED);
    if (shared == MAP_FAILED) return;
    volatile uint32_t *private = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    shared[0] = 1;
    private[0] = 1;
    pid_t pid = fork();
    if (pid == 0) {
        shared[0] = 2;
        shared[1024] = 3; /* the second page */
        private[0] = 2;
        /* The parent's write after the fork reaches the child too. */
        for (int i = 0; i < 5000 && shared[2] != 7; i++) usleep(1000);
        _exit(shared[2] == 7 ? 0 : 1);
    }
    for (int i = 0; i < 5000 && shared[0] != 2; i++) usleep(1000);
    CHECK(shared[0] == 2);
    for (int i = 0; i < 5000 && shared[1024] != 3; i++) usleep(1000);
    CHECK(shared[1024] == 3);
    shared[2] = 7;
    CHECK(child_status(pid) == 0);
    CHECK(private[0] == 1); /* private memory stays copy-on-write */
    munmap((void *)shared, 8192);
    munmap((void *)private, 4096);
}

/* A shared file mapping is the file: writes through it are what read() sees, and write()
 * is what the mapping sees, in this process and in a child. */
static void a_file_mapping_is_the_file(void) {
    const char *path = "/tmp/shared-file";
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, 8192) == 0);
    char *map = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(map != MAP_FAILED);
    if (map == MAP_FAILED) return;
    memcpy(map + 100, "through the map", 15);
    char buf[32] = {0};
    CHECK(pread(fd, buf, 15, 100) == 15);
    CHECK(memcmp(buf, "through the map", 15) == 0);
    CHECK(pwrite(fd, "through write", 13, 5000) == 13);
    CHECK(memcmp(map + 5000, "through write", 13) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        memcpy(map + 200, "from the child", 14);
        _exit(0);
    }
    CHECK(child_status(pid) == 0);
    CHECK(memcmp(map + 200, "from the child", 14) == 0);
    CHECK(msync(map, 8192, MS_SYNC) == 0);
    /* A read-only shared mapping of the same file sees later writes too. */
    int ro = open(path, O_RDONLY);
    char *view = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(view != MAP_FAILED);
    map[300] = 'x';
    CHECK(view != MAP_FAILED && view[300] == 'x');
    /* PROT_WRITE of a file open read-only is refused. */
    CHECK(mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ro, 0) == MAP_FAILED &&
          errno == EACCES);
    /* The mapping survives munmap of another one, and what it wrote stays in the file. */
    munmap(view, 4096);
    munmap(map, 8192);
    memset(buf, 0, sizeof buf);
    CHECK(pread(ro, buf, 14, 200) == 14);
    CHECK(memcmp(buf, "from the child", 14) == 0);
    close(ro);
    close(fd);
    unlink(path);
}

/* A memfd mapped shared is shared with a child, and read() sees its writes. */
static void a_memfd_mapping_is_shared(void) {
    int fd = memfd_create("shared", MFD_CLOEXEC);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, 4096) == 0);
    char *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(map != MAP_FAILED);
    if (map == MAP_FAILED) return;
    pid_t pid = fork();
    if (pid == 0) {
        strcpy(map, "memfd from the child");
        _exit(0);
    }
    CHECK(child_status(pid) == 0);
    char buf[32] = {0};
    CHECK(pread(fd, buf, 20, 0) == 20);
    CHECK(strcmp(buf, "memfd from the child") == 0);
    munmap(map, 4096);
    close(fd);
}

/* Four processes count to 4 x 2000 under a named semaphore, whose waits block and wake
 * across processes (sem_open maps a file in /dev/shm shared). */
static void a_named_semaphore_orders_processes(void) {
    char name[64];
    snprintf(name, sizeof name, "/picocenter-test-%d", getpid());
    sem_t *lock = sem_open(name, O_CREAT | O_EXCL, 0600, 1);
    CHECK(lock != SEM_FAILED);
    if (lock == SEM_FAILED) return;
    CHECK(sem_unlink(name) == 0);
    volatile uint64_t *count = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t pids[4];
    for (int c = 0; c < 4; c++) {
        pids[c] = fork();
        if (pids[c] == 0) {
            for (int i = 0; i < 2000; i++) {
                if (sem_wait(lock) != 0) _exit(2);
                uint64_t seen = *count;
                if (i % 100 == 0) sched_yield(); /* let others reach the wait */
                *count = seen + 1;
                sem_post(lock);
            }
            _exit(0);
        }
    }
    for (int c = 0; c < 4; c++) CHECK(child_status(pids[c]) == 0);
    CHECK(*count == 8000);
    /* A wait with a timeout that nobody posts times out. */
    sem_t *empty = sem_open(name, O_CREAT | O_EXCL, 0600, 0);
    CHECK(empty != SEM_FAILED);
    sem_unlink(name);
    struct timespec at;
    clock_gettime(CLOCK_REALTIME, &at);
    at.tv_nsec += 50 * 1000 * 1000;
    if (at.tv_nsec >= 1000000000) { at.tv_sec++; at.tv_nsec -= 1000000000; }
    CHECK(sem_timedwait(empty, &at) == -1 && errno == ETIMEDOUT);
    sem_close(empty);
    sem_close(lock);
}

/* A process-shared mutex in shared memory, robust if asked. */
static int shared_mutex_init(pthread_mutex_t *mutex, int robust) {
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
    if (robust) pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
    return pthread_mutex_init(mutex, &ma);
}

/* A child blocks on a process-shared condition variable until the parent signals it. */
static void a_shared_condition_variable_wakes_another_process(void) {
    struct shared {
        pthread_mutex_t mutex;
        pthread_cond_t cond;
        int ready, answer;
    } *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(s != MAP_FAILED);
    if (s == MAP_FAILED) return;
    CHECK(shared_mutex_init(&s->mutex, 0) == 0);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setpshared(&ca, PTHREAD_PROCESS_SHARED);
    pthread_cond_init(&s->cond, &ca);
    pid_t pid = fork();
    if (pid == 0) {
        pthread_mutex_lock(&s->mutex);
        while (!s->ready) pthread_cond_wait(&s->cond, &s->mutex);
        int answer = s->answer;
        pthread_mutex_unlock(&s->mutex);
        _exit(answer == 42 ? 0 : 1);
    }
    usleep(20000); /* the child is most likely waiting by now; either way it must end */
    pthread_mutex_lock(&s->mutex);
    s->ready = 1;
    s->answer = 42;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->mutex);
    CHECK(child_status(pid) == 0);
    munmap(s, sizeof *s);
}

/* A timed wait that a post from another process ends leaves nothing behind: the next timed
 * wait from the same place, long after the first one's deadline, waits its own time. (With
 * a second thread in the process, as here, a wait parks its thread.) Also /dev/zero mapped
 * shared is shared anonymous memory. */
static void a_woken_timed_wait_leaves_no_deadline_behind(void) {
    volatile uint32_t *go = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED,
                                 open("/dev/zero", O_RDWR), 0);
    CHECK(go != MAP_FAILED);
    sem_t *sem = mmap(NULL, sizeof(sem_t), PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(sem_init(sem, 1, 0) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        for (int round = 1; round <= 3; round++) {
            while (*go < round) usleep(1000);
            usleep(20000);
            sem_post(sem);
        }
        _exit(0);
    }
    for (int round = 1; round <= 3; round++) {
        *go = round;
        struct timespec at;
        clock_gettime(CLOCK_REALTIME, &at);
        at.tv_nsec += 200 * 1000 * 1000; /* the post comes after ~20 ms */
        if (at.tv_nsec >= 1000000000) { at.tv_sec++; at.tv_nsec -= 1000000000; }
        int rc;
        while ((rc = sem_timedwait(sem, &at)) != 0 && errno == EINTR) {}
        CHECK(rc == 0);
        /* Well past that wait's deadline, with no other blocking call in between (which
         * would have a deadline of its own). */
        struct timespec now, until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += 300 * 1000 * 1000;
        if (until.tv_nsec >= 1000000000) { until.tv_sec++; until.tv_nsec -= 1000000000; }
        do clock_gettime(CLOCK_MONOTONIC, &now);
        while (now.tv_sec < until.tv_sec ||
               (now.tv_sec == until.tv_sec && now.tv_nsec < until.tv_nsec));
    }
    CHECK(child_status(pid) == 0);
}

/* A process that dies holding a process-shared robust mutex leaves it to the next locker
 * with EOWNERDEAD, which another process then makes consistent. */
static void a_robust_mutex_outlives_its_holder(void) {
    struct shared {
        pthread_mutex_t mutex;
        int value;
    } *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(s != MAP_FAILED);
    if (s == MAP_FAILED) return;
    CHECK(shared_mutex_init(&s->mutex, 1) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        pthread_mutex_lock(&s->mutex);
        s->value = 1;
        _exit(0); /* dies holding it */
    }
    CHECK(child_status(pid) == 0);
    CHECK(pthread_mutex_lock(&s->mutex) == EOWNERDEAD);
    CHECK(s->value == 1);
    CHECK(pthread_mutex_consistent(&s->mutex) == 0);
    CHECK(pthread_mutex_unlock(&s->mutex) == 0);
    CHECK(pthread_mutex_lock(&s->mutex) == 0);
    pthread_mutex_unlock(&s->mutex);
    munmap(s, sizeof *s);
}

static void *idle_thread(void *arg) {
    char c;
    read(*(int *)arg, &c, 1);
    return NULL;
}

static sigjmp_buf bus_jump;
static volatile int bus_code;
static void on_bus(int sig, siginfo_t *info, void *ctx) {
    bus_code = info->si_code;
    siglongjmp(bus_jump, 1);
}

/* Touching a shared file mapping past the end of its file is SIGBUS (BUS_ADRERR); a
 * system call given such a buffer fails with EFAULT. */
static void past_the_end_of_the_file_is_sigbus(void) {
    const char *path = "/tmp/shared-short";
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(ftruncate(fd, 4096) == 0);
    char *map = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(map != MAP_FAILED);
    if (map == MAP_FAILED) return;
    map[0] = 'a';
    struct sigaction sa = {0}, old;
    sa.sa_sigaction = on_bus;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGBUS, &sa, &old);
    int faulted = 0;
    if (sigsetjmp(bus_jump, 1) == 0) {
        map[4096] = 'b';
    } else {
        faulted = 1;
    }
    CHECK(faulted && bus_code == BUS_ADRERR);
    sigaction(SIGBUS, &old, NULL);
    int pipes[2];
    CHECK(pipe(pipes) == 0);
    CHECK(write(pipes[1], map + 4096, 16) == -1 && errno == EFAULT);
    close(pipes[0]);
    close(pipes[1]);
    /* Grown, the file's new page is there. */
    CHECK(ftruncate(fd, 8192) == 0);
    map[4096] = 'c';
    char c = 0;
    CHECK(pread(fd, &c, 1, 4096) == 1 && c == 'c');
    /* Shrunk under its mapping, a page the process touched is gone: a call given it fails
     * (EFAULT on Linux; the VMM, which must not fall to the SIGBUS, reads a zero page),
     * and the process goes on. */
    CHECK(ftruncate(fd, 0) == 0);
    CHECK(open(map, O_RDONLY) == -1);
    munmap(map, 8192);
    close(fd);
    unlink(path);
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    anonymous_memory_is_shared_with_a_child();
    a_file_mapping_is_the_file();
    a_memfd_mapping_is_shared();
    a_named_semaphore_orders_processes();
    a_shared_condition_variable_wakes_another_process();
    past_the_end_of_the_file_is_sigbus();
    a_robust_mutex_outlives_its_holder();
    int idle[2];
    CHECK(pipe(idle) == 0);
    pthread_t thread;
    pthread_create(&thread, NULL, idle_thread, &idle[0]);
    a_woken_timed_wait_leaves_no_deadline_behind();
    close(idle[1]);
    pthread_join(thread, NULL);
    DONE();
}
