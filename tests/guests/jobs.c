/* Job control between processes: SIGSTOP and SIGTSTP stop a child (it runs no more) and
 * SIGCONT continues it; wait4's WUNTRACED and WCONTINUED and waitid's WSTOPPED and
 * WCONTINUED report it, with SIGCHLD (CLD_STOPPED, CLD_CONTINUED) unless SA_NOCLDSTOP;
 * /proc shows a stopped child as T; a call a stopped child was blocked in goes on after it
 * continues; SIGKILL ends a stopped child; a handled SIGTSTP does not stop. Passes natively
 * too. */
#define _GNU_SOURCE
#include "check.h"
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile uint64_t *counter;
static volatile sig_atomic_t stopped_notes, continued_notes, tstp_handled;

static void on_chld(int sig, siginfo_t *info, void *ctx) {
    if (info->si_code == CLD_STOPPED) stopped_notes++;
    if (info->si_code == CLD_CONTINUED) continued_notes++;
}

static void on_tstp(int sig) { tstp_handled++; }

static void pause_ms(int ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* A child that counts without a system call, until killed. */
static pid_t counting_child(void) {
    pid_t pid = fork();
    if (pid == 0) {
        for (;;) (*counter)++;
    }
    /* It has started once it counts. */
    for (int i = 0; i < 5000 && *counter == 0; i++) pause_ms(1);
    return pid;
}

static char proc_state(pid_t pid) {
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return '?';
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return '?';
    buf[n] = 0;
    char *close_paren = strrchr(buf, ')');
    return close_paren && close_paren[1] == ' ' ? close_paren[2] : '?';
}

static void stop_and_continue(void) {
    *counter = 0;
    pid_t pid = counting_child();
    int status = 0;
    CHECK(kill(pid, SIGSTOP) == 0);
    CHECK(waitpid(pid, &status, WUNTRACED) == pid);
    CHECK(WIFSTOPPED(status) && WSTOPSIG(status) == SIGSTOP);
    CHECK(proc_state(pid) == 'T');
    uint64_t at_stop = *counter;
    pause_ms(50);
    CHECK(*counter == at_stop);
    /* Nothing more to report until it changes again. */
    CHECK(waitpid(pid, &status, WUNTRACED | WCONTINUED | WNOHANG) == 0);
    CHECK(kill(pid, SIGCONT) == 0);
    CHECK(waitpid(pid, &status, WCONTINUED) == pid);
    CHECK(WIFCONTINUED(status));
    for (int i = 0; i < 5000 && *counter == at_stop; i++) pause_ms(1);
    CHECK(*counter > at_stop);
    CHECK(proc_state(pid) != 'T');
    /* SIGCHLD came for both. */
    for (int i = 0; i < 2000 && (stopped_notes < 1 || continued_notes < 1); i++) pause_ms(1);
    CHECK(stopped_notes == 1 && continued_notes == 1);
    /* SIGTSTP stops too, and waitid says so; a stopped child dies of SIGKILL. */
    CHECK(kill(pid, SIGTSTP) == 0);
    siginfo_t info = {0};
    CHECK(waitid(P_PID, pid, &info, WSTOPPED) == 0);
    CHECK(info.si_pid == pid && info.si_code == CLD_STOPPED && info.si_status == SIGTSTP);
    CHECK(kill(pid, SIGKILL) == 0);
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
}

/* A child blocked in read goes on reading once continued: the call is not interrupted. */
static void a_blocked_call_goes_on_after_a_stop(void) {
    int fds[2];
    CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        char c = 0;
        ssize_t n = read(fds[0], &c, 1);
        _exit(n == 1 && c == 'x' ? 0 : 1);
    }
    pause_ms(20);
    int status = 0;
    CHECK(kill(pid, SIGSTOP) == 0);
    CHECK(waitpid(pid, &status, WUNTRACED) == pid && WIFSTOPPED(status));
    CHECK(write(fds[1], "x", 1) == 1);
    pause_ms(20);
    /* Stopped, it has not read yet. */
    CHECK(waitpid(pid, &status, WNOHANG) == 0);
    CHECK(kill(pid, SIGCONT) == 0);
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    close(fds[0]);
    close(fds[1]);
}

static volatile sig_atomic_t usr1_seen;
static void on_usr1(int sig) { usr1_seen = 1; }

/* A stop and continue do not end a sigsuspend (it is performed again, with its mask), and a
 * SIGCONT sent right after a SIGSTOP leaves the child running. */
static void a_stop_is_not_an_interruption(void) {
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGUSR1, on_usr1);
        sigset_t usr1, empty, now;
        sigemptyset(&usr1);
        sigaddset(&usr1, SIGUSR1);
        sigemptyset(&empty);
        sigprocmask(SIG_BLOCK, &usr1, NULL);
        int rc = sigsuspend(&empty);
        sigprocmask(SIG_BLOCK, NULL, &now);
        /* Woken by SIGUSR1 itself, with SIGUSR1 blocked again. */
        _exit(rc == -1 && errno == EINTR && usr1_seen && sigismember(&now, SIGUSR1) ? 0 : 1);
    }
    pause_ms(30);
    int status = 0;
    CHECK(kill(pid, SIGSTOP) == 0);
    CHECK(waitpid(pid, &status, WUNTRACED) == pid && WIFSTOPPED(status));
    CHECK(kill(pid, SIGCONT) == 0);
    CHECK(waitpid(pid, &status, WCONTINUED) == pid && WIFCONTINUED(status));
    pause_ms(30);
    CHECK(waitpid(pid, &status, WNOHANG) == 0); /* still in sigsuspend */
    CHECK(kill(pid, SIGUSR1) == 0);
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    *counter = 0;
    pid = counting_child();
    CHECK(kill(pid, SIGSTOP) == 0);
    CHECK(kill(pid, SIGCONT) == 0);
    /* Whether or not the stop took effect before the SIGCONT, the child runs on. */
    pause_ms(20);
    uint64_t seen = *counter;
    for (int i = 0; i < 5000 && *counter == seen; i++) pause_ms(1);
    CHECK(*counter > seen);
    CHECK(kill(pid, SIGKILL) == 0);
    CHECK(waitpid(pid, &status, 0) == pid);
}

/* A child that handles SIGTSTP is not stopped by it; with SA_NOCLDSTOP the parent gets no
 * SIGCHLD for a stop. */
static void handled_stops_and_no_notes(void) {
    int fds[2];
    CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGTSTP, on_tstp);
        CHECK(write(fds[1], "r", 1) == 1);
        for (int i = 0; i < 5000 && !tstp_handled; i++) pause_ms(1);
        _exit(tstp_handled ? 7 : 1);
    }
    char c;
    CHECK(read(fds[0], &c, 1) == 1);
    CHECK(kill(pid, SIGTSTP) == 0);
    int status = 0;
    CHECK(waitpid(pid, &status, WUNTRACED) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 7);
    close(fds[0]);
    close(fds[1]);

    struct sigaction sa = {0};
    sa.sa_sigaction = on_chld;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    stopped_notes = continued_notes = 0;
    *counter = 0;
    pid = counting_child();
    CHECK(kill(pid, SIGSTOP) == 0);
    CHECK(waitpid(pid, &status, WUNTRACED) == pid && WIFSTOPPED(status));
    CHECK(kill(pid, SIGCONT) == 0);
    CHECK(waitpid(pid, &status, WCONTINUED) == pid && WIFCONTINUED(status));
    pause_ms(20);
    CHECK(stopped_notes == 0 && continued_notes == 0);
    CHECK(kill(pid, SIGKILL) == 0);
    CHECK(waitpid(pid, &status, 0) == pid);
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    counter = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    struct sigaction sa = {0};
    sa.sa_sigaction = on_chld;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGCHLD, &sa, NULL);
    stop_and_continue();
    a_blocked_call_goes_on_after_a_stop();
    a_stop_is_not_an_interruption();
    handled_stops_and_no_notes();
    DONE();
}
