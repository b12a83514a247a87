/* Process costs, printed as a median in nanoseconds (see benches/processes.rs):
 *   fork64 N     fork + _exit + waitpid with 64 MiB touched in the parent
 *   spawn N      posix_spawn of this program (which exits at once) + waitpid
 *   shell N SH   posix_spawn of `SH -c 'true | true'` + waitpid
 *   semping N    a round trip between two processes through two process-shared
 *                semaphores in shared memory (each post wakes the other's wait)
 *   idle K       touches 64 MiB, prints "parent", waits for a line on stdin, forks K
 *                children that sleep, prints "children", then sleeps until killed */
#define _GNU_SOURCE
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <semaphore.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static int64_t now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000ll + t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static char *touch64(void) {
    char *memory = malloc(64 << 20);
    memset(memory, 1, 64 << 20);
    return memory;
}

int main(int argc, char **argv) {
    if (argc < 3) return !(argc == 2 && !strcmp(argv[1], "exit")) ? 2 : 0;
    int n = atoi(argv[2]);
    if (!strcmp(argv[1], "idle")) {
        volatile char *memory = touch64();
        printf("parent\n");
        fflush(stdout);
        char go[2];
        if (read(0, go, 1) != 1) return 5;
        for (int i = 0; i < n; i++)
            if (fork() == 0) for (;;) pause();
        printf("children\n");
        fflush(stdout);
        for (;;) pause();
        return memory[0];
    }
    if (n < 1 || n > 100000) return 2;
    int64_t *samples = calloc(n, sizeof *samples);
    if (!strcmp(argv[1], "semping")) {
        sem_t *sems = mmap(NULL, 2 * sizeof(sem_t), PROT_READ | PROT_WRITE,
                           MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (sems == MAP_FAILED || sem_init(&sems[0], 1, 0) || sem_init(&sems[1], 1, 0))
            return 3;
        pid_t pid = fork();
        if (pid == 0) {
            for (int i = 0; i < n; i++) {
                while (sem_wait(&sems[0]) != 0) {}
                sem_post(&sems[1]);
            }
            _exit(0);
        }
        for (int i = 0; i < n; i++) {
            int64_t start = now();
            sem_post(&sems[0]);
            while (sem_wait(&sems[1]) != 0) {}
            samples[i] = now() - start;
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return 4;
        qsort(samples, n, sizeof *samples, cmp);
        printf("%lld\n", (long long)samples[n / 2]);
        return 0;
    }
    char *memory = !strcmp(argv[1], "fork64") ? touch64() : NULL;
    for (int i = 0; i < n; i++) {
        int status;
        pid_t pid;
        int64_t start = now();
        if (memory) {
            pid = fork();
            if (pid == 0) _exit(memory[i] - 1);
        } else if (!strcmp(argv[1], "spawn")) {
            char *args[] = {argv[0], "exit", NULL};
            if (posix_spawn(&pid, argv[0], NULL, NULL, args, environ)) return 3;
        } else if (!strcmp(argv[1], "shell") && argc > 3) {
            char *args[] = {argv[3], "-c", "true | true", NULL};
            if (posix_spawn(&pid, argv[3], NULL, NULL, args, environ)) return 3;
        } else {
            return 2;
        }
        if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0)
            return 4;
        samples[i] = now() - start;
    }
    qsort(samples, n, sizeof *samples, cmp);
    printf("%lld\n", (long long)samples[n / 2]);
    return 0;
}
