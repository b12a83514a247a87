/* User and group ids (credentials(7)): root drops and takes back its effective uid, a
 * fork keeps the ids, an execve saves the effective ones, /proc/self/status shows them,
 * and an unprivileged process may not take ids it does not hold. */
#define _GNU_SOURCE
#include "check.h"
#include <grp.h>
#include <stdlib.h>
#include <sys/auxv.h>
#include <sys/fsuid.h>
#include <sys/wait.h>
#include <unistd.h>

static int status_line_of(const char *file, const char *name, char *out, size_t size) {
    FILE *f = fopen(file, "r");
    if (!f)
        return -1;
    char line[256];
    int found = -1;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, name, strlen(name)) == 0) {
            snprintf(out, size, "%s", line + strlen(name));
            found = 0;
        }
    }
    fclose(f);
    return found;
}

static int status_line(const char *name, char *out, size_t size) {
    return status_line_of("/proc/self/status", name, out, size);
}

int main(int argc, char **argv) {
    uid_t r, e, s;
    if (argc == 2 && strcmp(argv[1], "after-exec") == 0) {
        /* Exec'd with real 0, effective 105, saved 0: the saved uid is now 105. */
        CHECK(getresuid(&r, &e, &s) == 0 && r == 0 && e == 105 && s == 105);
        /* The loader was told, and runs it securely (no LD_PRELOAD). */
        CHECK(getauxval(AT_UID) == 0 && getauxval(AT_EUID) == 105);
        CHECK(getauxval(AT_SECURE) == 1);
        CHECK(seteuid(0) == 0);
        DONE();
    }
    CHECK(getuid() == 0 && geteuid() == 0 && getgid() == 0 && getegid() == 0);
    CHECK(getgroups(0, NULL) == 0);
    CHECK(getauxval(AT_SECURE) == 0);

    /* Kept sorted. */
    gid_t groups[] = {109, 8};
    CHECK(setgroups(2, groups) == 0);
    gid_t got[4] = {0};
    CHECK(getgroups(4, got) == 2 && got[0] == 8 && got[1] == 109);
    CHECK(getgroups(1, got) == -1 && errno == EINVAL);

    /* Drop the effective uid only, then take it back (postfix's local delivery). */
    CHECK(setresuid(-1, 1000, -1) == 0);
    CHECK(getuid() == 0 && geteuid() == 1000);
    CHECK(setgid(5) == -1 && errno == EPERM);
    CHECK(setgroups(0, NULL) == -1 && errno == EPERM);
    char line[128];
    CHECK(status_line("Uid:", line, sizeof line) == 0 && strcmp(line, "\t0\t1000\t0\t1000\n") == 0);
    CHECK(status_line("Groups:", line, sizeof line) == 0 && strcmp(line, "\t8 109 \n") == 0);
    CHECK(seteuid(0) == 0 && geteuid() == 0);
    CHECK(setfsuid(77) == 0 && setfsuid(-1) == 77);
    CHECK(seteuid(0) == 0 && setfsuid(-1) == 0);

    /* A child keeps its parent's ids and drops them for good; the parent's stay, and
     * see the child's in its /proc status. */
    int told[2], asked[2];
    CHECK(pipe(told) == 0 && pipe(asked) == 0);
    pid_t child = fork();
    if (child == 0) {
        int bad = 0;
        bad |= getresuid(&r, &e, &s) != 0 || r != 0 || e != 0 || s != 0;
        bad |= setgid(109) != 0 || setuid(105) != 0;
        bad |= getuid() != 105 || geteuid() != 105 || getgid() != 109 || getegid() != 109;
        bad |= setuid(0) != -1 || errno != EPERM;
        bad |= setresuid(-1, 0, -1) != -1 || errno != EPERM;
        bad |= setreuid(105, 105) != 0;
        char byte = 'x';
        bad |= write(told[1], &byte, 1) != 1 || read(asked[0], &byte, 1) != 1;
        _exit(bad);
    }
    char byte;
    CHECK(read(told[0], &byte, 1) == 1);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", child);
    CHECK(status_line_of(path, "Uid:", line, sizeof line) == 0 &&
          strcmp(line, "\t105\t105\t105\t105\n") == 0);
    CHECK(status_line_of(path, "Gid:", line, sizeof line) == 0 &&
          strcmp(line, "\t109\t109\t109\t109\n") == 0);
    CHECK(write(asked[1], &byte, 1) == 1);
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(getuid() == 0 && geteuid() == 0);

    /* An execve saves the effective uid. */
    child = fork();
    if (child == 0) {
        if (setresuid(0, 105, 0) != 0)
            _exit(3);
        execl("/proc/self/exe", argv[0], "after-exec", (char *)NULL);
        _exit(4);
    }
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    DONE();
}
