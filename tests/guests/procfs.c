/* The app's /proc as a directory tree: /proc lists the app's processes and self, a
 * process's directory lists its entries, fd/ its open fds, stat and readlink see what
 * Linux shows, maps names the program and the stack, and another process of the app
 * shows its command line, parent, program, working directory, maps and fd/. Prints
 * PASSED or what failed. */
#include "check.h"
#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* Whether directory `path` lists `name`. */
static int lists(const char *path, const char *name) {
    DIR *dir = opendir(path);
    if (!dir) return 0;
    int found = 0;
    for (struct dirent *e; (e = readdir(dir));)
        if (!strcmp(e->d_name, name)) found = 1;
    closedir(dir);
    return found;
}

static int read_file(const char *path, char *buf, size_t size) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    int got = read(fd, buf, size - 1);
    close(fd);
    if (got >= 0) buf[got] = 0;
    return got;
}

int main(int argc, char **argv) {
    (void)argc;
    char me[16], path[64], buf[8192];
    snprintf(me, sizeof me, "%d", (int)getpid());
    CHECK(lists("/proc", "self"));
    CHECK(lists("/proc", me));
    CHECK(lists("/proc", "meminfo"));
    CHECK(readlink("/proc/self", buf, sizeof buf) == (ssize_t)strlen(me) && !strncmp(buf, me, strlen(me)));
    struct stat st;
    CHECK(stat("/proc/self", &st) == 0 && S_ISDIR(st.st_mode));
    CHECK(lstat("/proc/self", &st) == 0 && S_ISLNK(st.st_mode));
    CHECK(stat("/proc/self/fd", &st) == 0 && S_ISDIR(st.st_mode));
    CHECK(lists("/proc/self", "status") && lists("/proc/self", "fd") && lists("/proc/self", "exe"));
    /* fd/ lists what is open now, and not what was closed. */
    int fd = dup2(open("/proc/self/status", O_RDONLY), 100);
    CHECK(fd == 100 && lists("/proc/self/fd", "100") && lists("/proc/self/fd", "1"));
    close(fd);
    CHECK(!lists("/proc/self/fd", "100"));
    /* The listing shows the fd it is read through. */
    DIR *own = opendir("/proc/self/fd");
    char own_name[16];
    snprintf(own_name, sizeof own_name, "%d", own ? dirfd(own) : -1);
    int seen = 0;
    for (struct dirent *e; own && (e = readdir(own));)
        if (!strcmp(e->d_name, own_name)) seen = 1;
    CHECK(seen);
    if (own) closedir(own);
    /* openat relative to /proc/self. */
    int dir = open("/proc/self", O_RDONLY | O_DIRECTORY);
    CHECK(dir >= 0);
    int status = openat(dir, "status", O_RDONLY);
    CHECK(status >= 0 && read(status, buf, 5) == 5 && !strncmp(buf, "Name:", 5));
    close(status);
    close(dir);
    /* maps: the program, the stack, the vDSO. */
    CHECK(read_file("/proc/self/maps", buf, sizeof buf) > 0);
    CHECK(strstr(buf, argv[0]) && strstr(buf, "[stack]") && strstr(buf, "[vdso]") && strstr(buf, "r-xp"));
    /* Numbers in their one spelling only, as Linux's /proc has them. */
    CHECK(open("/proc/self/fd/01", O_RDONLY) == -1 && errno == ENOENT);
    CHECK(stat("/proc/self/fd/+1", &st) == -1 && errno == ENOENT);
    snprintf(path, sizeof path, "/proc/0%s/stat", me);
    CHECK(open(path, O_RDONLY) == -1 && errno == ENOENT);
    /* A directory per thread. */
    CHECK(lists("/proc/self/task", me));
    /* ps reads the boot time here. */
    CHECK(read_file("/proc/stat", buf, sizeof buf) > 0 && strstr(buf, "\nbtime ") && !strncmp(buf, "cpu ", 4));
    /* The app can write nothing there. */
    CHECK(open("/proc/self/new", O_WRONLY | O_CREAT, 0600) == -1);
    CHECK(mkdir("/proc/x", 0700) == -1);
    /* Another process of the app: listed, with its parent and command line, then gone. */
    int ready[2], done[2];
    CHECK(pipe(ready) == 0 && pipe(done) == 0);
    pid_t child = fork();
    if (child == 0) {
        chdir("/tmp");
        /* An fd the parent finds in this process's fd/ (its number is what it sends). */
        char byte = (char)open("/tmp", O_RDONLY | O_DIRECTORY);
        write(ready[1], &byte, 1);
        read(done[0], &byte, 1);
        _exit(0);
    }
    char byte;
    CHECK(read(ready[0], &byte, 1) == 1);
    char child_name[16];
    snprintf(child_name, sizeof child_name, "%d", (int)child);
    CHECK(lists("/proc", child_name) && lists("/proc", me));
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)child);
    CHECK(read_file(path, buf, sizeof buf) > 0 && !strcmp(buf, argv[0]));
    snprintf(path, sizeof path, "/proc/%d/stat", (int)child);
    int ppid = 0;
    char *after = read_file(path, buf, sizeof buf) > 0 ? strrchr(buf, ')') : NULL;
    CHECK(after && sscanf(after, ") %*c %d", &ppid) == 1 && ppid == getpid());
    /* Its program and working directory. */
    char link[256] = {0}, own_exe[256] = {0};
    CHECK(readlink("/proc/self/exe", own_exe, sizeof own_exe - 1) > 0);
    snprintf(path, sizeof path, "/proc/%d/exe", (int)child);
    CHECK(readlink(path, link, sizeof link - 1) > 0 && !strcmp(link, own_exe));
    memset(link, 0, sizeof link);
    snprintf(path, sizeof path, "/proc/%d/cwd", (int)child);
    CHECK(readlink(path, link, sizeof link - 1) > 0 && !strcmp(link, "/tmp"));
    snprintf(path, sizeof path, "/proc/%d", (int)child);
    CHECK(stat(path, &st) == 0 && S_ISDIR(st.st_mode));
    /* Its memory areas and open fds, as it has them now. */
    snprintf(path, sizeof path, "/proc/%d/maps", (int)child);
    CHECK(read_file(path, buf, sizeof buf) > 0 && strstr(buf, own_exe) && strstr(buf, "[stack]"));
    char fd_name[16];
    snprintf(fd_name, sizeof fd_name, "%d", (int)byte);
    snprintf(path, sizeof path, "/proc/%d/fd", (int)child);
    CHECK(byte > 2 && lists(path, fd_name) && lists(path, "0"));
    memset(link, 0, sizeof link);
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)child, (int)byte);
    CHECK(readlink(path, link, sizeof link - 1) > 0 && !strcmp(link, "/tmp"));
    CHECK(write(done[1], "x", 1) == 1);
    CHECK(waitpid(child, NULL, 0) == child);
    /* Gone at once, without a listing of /proc first. */
    CHECK(stat(path, &st) == -1 && errno == ENOENT);
    CHECK(!lists("/proc", child_name));
    /* Its own fds through its own pid's directory. */
    snprintf(path, sizeof path, "/proc/%s/fd/1", me);
    int again = open(path, O_WRONLY);
    CHECK(again >= 0 && write(again, "", 0) == 0);
    close(again);
    CHECK(lists("/proc/self/fd", "0"));
    DONE();
}
