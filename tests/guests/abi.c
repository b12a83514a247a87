/* Calls that behave as Linux has them, checked the same way natively and in a
 * picoprocess (tests/files.rs runs both):
 *
 *   abi DIR [confined]
 *               file names that are not UTF-8, symlinks (absolute, relative, across
 *               the writable mount's top), umask, truncate, fallocate, scheduling
 *               policies and priorities, memfd_create, copy_file_range, splice,
 *               tee, mincore, an IPv6-only listener beside an IPv4 one on one port,
 *               and the interfaces (getifaddrs and if_nameindex, through rtnetlink),
 *               with files under the writable directory DIR.
 */
#define _GNU_SOURCE
#include "check.h"
#include <arpa/inet.h>
#include <dirent.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static char path[4096];

static const char *at(const char *dir, const char *name) {
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return path;
}

/* Whether DIR holds an entry named exactly NAME (bytes). */
static int listed(const char *dir, const char *name) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int seen = 0;
    while (d && (e = readdir(d))) seen += !strcmp(e->d_name, name);
    if (d) closedir(d);
    return seen;
}

static void names(const char *dir) {
    const char *latin1 = "caf\xe9";          /* not UTF-8 */
    const char *renamed = "\xff\xfe-x";       /* not UTF-8 either */
    const char *plane16 = "\xf4\x8f\xbd\x81"; /* U+10FF41, valid UTF-8 */
    const char *raw = "\xf4";                 /* a lone lead byte */
    char buf[64];
    int fd = open(at(dir, latin1), O_CREAT | O_RDWR | O_TRUNC, 0644);
    CHECK(fd >= 0);
    CHECK(write(fd, "latin", 5) == 5);
    close(fd);
    CHECK(listed(dir, latin1) == 1);
    struct stat st;
    CHECK(stat(at(dir, latin1), &st) == 0 && st.st_size == 5);
    char from[4096];
    snprintf(from, sizeof from, "%s/%s", dir, latin1);
    CHECK(rename(from, at(dir, renamed)) == 0);
    CHECK(listed(dir, latin1) == 0 && listed(dir, renamed) == 1);
    fd = open(at(dir, renamed), O_RDONLY);
    CHECK(fd >= 0 && read(fd, buf, sizeof buf) == 5 && !memcmp(buf, "latin", 5));
    close(fd);
    CHECK(unlink(at(dir, renamed)) == 0 && listed(dir, renamed) == 0);

    /* Two names that differ only in how their bytes would be spelled stay two files. */
    CHECK(close(open(at(dir, plane16), O_CREAT | O_WRONLY, 0644)) == 0);
    CHECK(close(open(at(dir, raw), O_CREAT | O_WRONLY, 0644)) == 0);
    CHECK(listed(dir, plane16) == 1 && listed(dir, raw) == 1);
    CHECK(unlink(at(dir, plane16)) == 0 && listed(dir, raw) == 1);
    CHECK(unlink(at(dir, raw)) == 0);

    /* A directory with such a name, as the working directory. */
    CHECK(mkdir(at(dir, "d\x80"), 0755) == 0);
    CHECK(chdir(at(dir, "d\x80")) == 0);
    char cwd[4096];
    CHECK(getcwd(cwd, sizeof cwd) && !strcmp(cwd + strlen(cwd) - 3, "/d\x80"));
    CHECK(close(open("f\xe9", O_CREAT | O_WRONLY, 0644)) == 0 && listed(".", "f\xe9") == 1);
    CHECK(unlink("f\xe9") == 0);
    CHECK(chdir("/") == 0 && rmdir(at(dir, "d\x80")) == 0);
}

/* Symlinks resolve in the app's own tree, as on Linux: an absolute target starts at its
 * root (here it leads back into the writable mount), `..` in a target goes up past the
 * mount's top and back. */
static void symlinks(const char *dir) {
    char target[4096], rel[4096];
    struct stat st;
    CHECK(mkdir(at(dir, "real"), 0755) == 0);
    int fd = open(at(dir, "real/f"), O_CREAT | O_WRONLY, 0644);
    CHECK(fd >= 0 && write(fd, "x", 1) == 1);
    close(fd);
    snprintf(target, sizeof target, "%s/real", dir);
    CHECK(symlink(target, at(dir, "abs")) == 0);
    CHECK(stat(at(dir, "abs/f"), &st) == 0 && st.st_size == 1);
    CHECK(lstat(at(dir, "abs"), &st) == 0 && S_ISLNK(st.st_mode));
    /* The working directory is the real one, as getcwd reports it. */
    char cwd[4096];
    CHECK(chdir(at(dir, "abs")) == 0 && getcwd(cwd, sizeof cwd) &&
          !strcmp(cwd + strlen(cwd) - 5, "/real"));
    CHECK(chdir("/") == 0);
    CHECK(stat(at(dir, "abs"), &st) == 0 && S_ISDIR(st.st_mode));
    const char *base = strrchr(dir, '/') ? strrchr(dir, '/') + 1 : dir;
    snprintf(rel, sizeof rel, "../%s/real", base);
    CHECK(symlink(rel, at(dir, "rel")) == 0);
    CHECK(stat(at(dir, "rel/f"), &st) == 0 && st.st_size == 1);
    snprintf(target, sizeof target, "%s/abs", dir);
    CHECK(symlink(target, at(dir, "chain")) == 0);
    fd = open(at(dir, "chain/f"), O_RDONLY);
    char c = 0;
    CHECK(fd >= 0 && read(fd, &c, 1) == 1 && c == 'x');
    close(fd);
    /* Creating through an absolute link makes the file where it leads. */
    fd = open(at(dir, "abs/made"), O_CREAT | O_WRONLY, 0600);
    CHECK(fd >= 0 && fstat(fd, &st) == 0 && (st.st_mode & 0777) == 0600);
    close(fd);
    CHECK(access(at(dir, "real/made"), F_OK) == 0);
    snprintf(target, sizeof target, "%s/loop", dir);
    CHECK(symlink(target, at(dir, "loop")) == 0);
    CHECK(open(at(dir, "loop"), O_RDONLY) == -1 && errno == ELOOP);
    CHECK(open(at(dir, "abs"), O_RDONLY | O_NOFOLLOW) == -1 && errno == ELOOP);
    /* umask 002: directories 0775, files 0664, exactly. */
    mode_t old = umask(002);
    CHECK(mkdir(at(dir, "group"), 0777) == 0 && stat(at(dir, "group"), &st) == 0 &&
          (st.st_mode & 0777) == 0775);
    fd = open(at(dir, "group/f"), O_CREAT | O_WRONLY, 0666);
    CHECK(fd >= 0 && fstat(fd, &st) == 0 && (st.st_mode & 0777) == 0664);
    close(fd);
    umask(old);
    unlink(at(dir, "group/f"));
    rmdir(at(dir, "group"));
    for (const char *n = "abs\0rel\0chain\0loop\0real/f\0real/made\0"; *n; n += strlen(n) + 1)
        CHECK(unlink(at(dir, n)) == 0);
    CHECK(rmdir(at(dir, "real")) == 0);
}

/* truncate, fallocate, scheduling policies and priorities. */
static void sizes_and_scheduling(const char *dir) {
    struct stat st;
    int fd = open(at(dir, "sized"), O_CREAT | O_RDWR, 0644);
    CHECK(fd >= 0 && write(fd, "0123456789", 10) == 10);
    CHECK(truncate(at(dir, "sized"), 4) == 0 && fstat(fd, &st) == 0 && st.st_size == 4);
    CHECK(truncate(at(dir, "nowhere"), 4) == -1 && errno == ENOENT);
    CHECK(fallocate(fd, 0, 0, 8192) == 0 && fstat(fd, &st) == 0 && st.st_size == 8192);
    CHECK(posix_fallocate(fd, 0, 10000) == 0 && fstat(fd, &st) == 0 && st.st_size == 10000);
    close(fd);
    CHECK(unlink(at(dir, "sized")) == 0);
    CHECK(sched_get_priority_max(SCHED_FIFO) == 99 && sched_get_priority_min(SCHED_FIFO) == 1);
    CHECK(sched_get_priority_max(SCHED_OTHER) == 0 && sched_get_priority_min(SCHED_OTHER) == 0);
    CHECK(sched_get_priority_max(12345) == -1 && errno == EINVAL);
    CHECK(sched_getscheduler(0) == SCHED_OTHER);
    struct sched_param param = {.sched_priority = 7};
    CHECK(sched_getparam(0, &param) == 0 && param.sched_priority == 0);
    struct timespec quantum;
    CHECK(sched_rr_get_interval(0, &quantum) == 0 && quantum.tv_sec == 0);
    param.sched_priority = 0;
    CHECK(sched_setscheduler(0, SCHED_BATCH, &param) == 0);
    CHECK(sched_setscheduler(0, SCHED_OTHER, &param) == 0);
    errno = 0;
    int before = getpriority(PRIO_PROCESS, 0);
    CHECK(errno == 0 && setpriority(PRIO_PROCESS, 0, before + 2) == 0);
    CHECK(getpriority(PRIO_PROCESS, 0) == before + 2);
    CHECK(setpriority(PRIO_PROCESS, 0, before) == 0 && getpriority(PRIO_PROCESS, 0) == before);
}

static void memfd(void) {
    int fd = memfd_create("pico\xe9", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    CHECK(fd >= 0);
    CHECK(write(fd, "0123456789", 10) == 10);
    struct stat st;
    CHECK(fstat(fd, &st) == 0 && st.st_size == 10 && S_ISREG(st.st_mode));
    CHECK(ftruncate(fd, 8192) == 0);
    char *m = mmap(NULL, 8192, PROT_READ, MAP_PRIVATE, fd, 0);
    CHECK(m != MAP_FAILED && !memcmp(m, "0123456789", 10) && m[4096] == 0);
    if (m != MAP_FAILED) munmap(m, 8192);
    CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW) == 0);
    CHECK(fcntl(fd, F_GET_SEALS) == (F_SEAL_WRITE | F_SEAL_GROW));
    CHECK(pwrite(fd, "x", 1, 0) == -1 && errno == EPERM);
    CHECK(fcntl(fd, F_GETFD) == FD_CLOEXEC);
    close(fd);
    /* No sealing unless asked for; no huge pages here (or a bad flag). */
    fd = memfd_create("plain", 0);
    CHECK(fd >= 0 && fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE) == -1 && errno == EPERM);
    close(fd);
    CHECK(memfd_create("bad", 0x4000) == -1 && errno == EINVAL);
}

static void copies(const char *dir) {
    char buf[64];
    int in = open(at(dir, "copy-in"), O_CREAT | O_RDWR | O_TRUNC, 0644);
    CHECK(in >= 0 && write(in, "hello, copies", 13) == 13);
    int out = open(at(dir, "copy-out"), O_CREAT | O_RDWR | O_TRUNC, 0644);
    CHECK(out >= 0);
    /* With offsets: the files' own offsets stay. */
    loff_t off_in = 7, off_out = 0;
    CHECK(copy_file_range(in, &off_in, out, &off_out, 100, 0) == 6);
    CHECK(off_in == 13 && off_out == 6);
    CHECK(pread(out, buf, sizeof buf, 0) == 6 && !memcmp(buf, "copies", 6));
    /* Without: the file offsets move. */
    CHECK(lseek(in, 0, SEEK_SET) == 0 && lseek(out, 6, SEEK_SET) == 6);
    CHECK(copy_file_range(in, NULL, out, NULL, 5, 0) == 5);
    CHECK(lseek(in, 0, SEEK_CUR) == 5 && lseek(out, 0, SEEK_CUR) == 11);
    CHECK(pread(out, buf, sizeof buf, 0) == 11 && !memcmp(buf, "copieshello", 11));
    CHECK(copy_file_range(in, NULL, 999, NULL, 5, 0) == -1 && errno == EBADF);
    CHECK(copy_file_range(in, NULL, out, NULL, 5, 1) == -1 && errno == EINVAL);
    int ro = open(at(dir, "copy-in"), O_RDONLY);
    CHECK(copy_file_range(in, NULL, ro, NULL, 5, 0) == -1 && errno == EBADF);
    close(ro);

    /* splice: file -> pipe -> file, and tee between pipes. */
    int p[2], q[2];
    CHECK(pipe(p) == 0 && pipe(q) == 0);
    loff_t from = 0;
    CHECK(splice(in, &from, p[1], NULL, 13, 0) == 13 && from == 13);
    CHECK(tee(p[0], q[1], 13, 0) == 13);
    CHECK(read(q[0], buf, 13) == 13 && !memcmp(buf, "hello, copies", 13));
    CHECK(ftruncate(out, 0) == 0);
    loff_t to = 0;
    CHECK(splice(p[0], NULL, out, &to, 13, 0) == 13 && to == 13);
    CHECK(pread(out, buf, sizeof buf, 0) == 13 && !memcmp(buf, "hello, copies", 13));
    /* An empty pipe: SPLICE_F_NONBLOCK says EAGAIN rather than wait. */
    CHECK(splice(p[0], NULL, out, NULL, 13, SPLICE_F_NONBLOCK) == -1 && errno == EAGAIN);
    /* Neither end a pipe. */
    CHECK(splice(in, NULL, out, NULL, 13, 0) == -1 && errno == EINVAL);
    close(p[0]); close(p[1]); close(q[0]); close(q[1]);
    close(in); close(out);
    unlink(at(dir, "copy-in"));
    unlink(at(dir, "copy-out"));
}

static void residency(void) {
    long page = sysconf(_SC_PAGESIZE);
    char *m = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED);
    m[0] = 1;
    m[2 * page] = 1;
    unsigned char vec[4] = {9, 9, 9, 9};
    CHECK(mincore(m, 4 * page, vec) == 0);
    CHECK((vec[0] & 1) && (vec[2] & 1) && vec[1] <= 1 && vec[3] <= 1);
    CHECK(mincore(m + 1, page, vec) == -1 && errno == EINVAL);
    CHECK(munmap(m + 3 * page, page) == 0);
    CHECK(mincore(m, 4 * page, vec) == -1 && errno == ENOMEM);
    munmap(m, 3 * page);
}

/* redis's default `bind * -::*`: an IPv4 socket on 0.0.0.0 and an IPv6-only one on ::,
 * on one port; then a client reaches the IPv6 one at the address it reports. */
static void dual_stack(void) {
    int v4 = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    CHECK(setsockopt(v4, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0);
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY)};
    CHECK(bind(v4, (struct sockaddr *)&a4, sizeof a4) == 0 && listen(v4, 8) == 0);
    socklen_t len = sizeof a4;
    CHECK(getsockname(v4, (struct sockaddr *)&a4, &len) == 0 && a4.sin_port != 0);

    int v6 = socket(AF_INET6, SOCK_STREAM, 0);
    CHECK(setsockopt(v6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) == 0);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = in6addr_any,
                              .sin6_port = a4.sin_port};
    CHECK(bind(v6, (struct sockaddr *)&a6, sizeof a6) == 0 && listen(v6, 8) == 0);
    len = sizeof a6;
    CHECK(getsockname(v6, (struct sockaddr *)&a6, &len) == 0 && a6.sin6_port == a4.sin_port);
    /* Natively the socket says ::, which a connect takes as the host itself. */
    if (IN6_IS_ADDR_UNSPECIFIED(&a6.sin6_addr)) a6.sin6_addr = in6addr_loopback;
    int c = socket(AF_INET6, SOCK_STREAM, 0);
    CHECK(connect(c, (struct sockaddr *)&a6, sizeof a6) == 0);
    int s = accept(v6, NULL, NULL);
    CHECK(s >= 0 && write(c, "six", 3) == 3);
    char buf[8];
    CHECK(read(s, buf, sizeof buf) == 3 && !memcmp(buf, "six", 3));
    close(s); close(c); close(v6); close(v4);
}

/* sendmmsg and recvmmsg over UDP on localhost; the interface ioctls. */
static void many_messages(void) {
    int rx = socket(AF_INET, SOCK_DGRAM, 0), tx = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in lo = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof lo;
    CHECK(bind(rx, (struct sockaddr *)&lo, sizeof lo) == 0);
    CHECK(getsockname(rx, (struct sockaddr *)&lo, &len) == 0);
    CHECK(connect(tx, (struct sockaddr *)&lo, sizeof lo) == 0);
    char *words[3] = {"one", "two", "three"};
    struct iovec out[3];
    struct mmsghdr send_msgs[3];
    memset(send_msgs, 0, sizeof send_msgs);
    for (int i = 0; i < 3; i++) {
        out[i] = (struct iovec){words[i], strlen(words[i])};
        send_msgs[i].msg_hdr.msg_iov = &out[i];
        send_msgs[i].msg_hdr.msg_iovlen = 1;
    }
    CHECK(sendmmsg(tx, send_msgs, 3, 0) == 3 && send_msgs[2].msg_len == 5);
    char bufs[3][16];
    struct iovec in[3];
    struct mmsghdr recv_msgs[3];
    memset(recv_msgs, 0, sizeof recv_msgs);
    for (int i = 0; i < 3; i++) {
        in[i] = (struct iovec){bufs[i], sizeof bufs[i]};
        recv_msgs[i].msg_hdr.msg_iov = &in[i];
        recv_msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int got = 0;
    for (int tries = 0; tries < 100 && got < 3; tries++) {
        int n = recvmmsg(rx, recv_msgs + got, 3 - got, 0, NULL);
        if (n > 0) got += n;
    }
    CHECK(got == 3 && recv_msgs[1].msg_len == 3 && !memcmp(bufs[2], "three", 5));
    struct ifreq ifr = {0};
    strcpy(ifr.ifr_name, "lo");
    CHECK(ioctl(rx, SIOCGIFINDEX, &ifr) == 0 && ifr.ifr_ifindex >= 1);
    CHECK(if_nametoindex("lo") >= 1 && if_nametoindex("nonesuch0") == 0);
    close(rx);
    close(tx);
}

/* The interfaces, through rtnetlink: lo is up and holds a 127/8 address. In a picoprocess
 * (CONFINED), changes are refused as for any unprivileged process, and only rtnetlink
 * exists; natively, as root, they are not tried. */
static void interfaces(int confined) {
    struct ifaddrs *all = NULL;
    CHECK(getifaddrs(&all) == 0);
    int lo_v4 = 0, lo_link = 0;
    for (struct ifaddrs *i = all; i; i = i->ifa_next) {
        if (strcmp(i->ifa_name, "lo") || !i->ifa_addr) continue;
        if (!(i->ifa_flags & IFF_UP) || !(i->ifa_flags & IFF_LOOPBACK)) continue;
        if (i->ifa_addr->sa_family == AF_PACKET) lo_link++;
        if (i->ifa_addr->sa_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)i->ifa_addr;
            struct sockaddr_in *m = (struct sockaddr_in *)i->ifa_netmask;
            lo_v4 += (ntohl(a->sin_addr.s_addr) >> 24) == 127 && m &&
                     ntohl(m->sin_addr.s_addr) == 0xff000000;
        }
    }
    CHECK(lo_v4 >= 1 && lo_link == 1);
    freeifaddrs(all);
    struct if_nameindex *names = if_nameindex();
    int lo = 0;
    for (struct if_nameindex *n = names; n && n->if_index; n++) lo += !strcmp(n->if_name, "lo");
    CHECK(names && lo == 1);
    if (names) if_freenameindex(names);
    if (!confined) return;
    int nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    CHECK(nl >= 0);
    struct { struct nlmsghdr h; struct rtmsg r; } req = {
        .h = {.nlmsg_len = sizeof req, .nlmsg_type = RTM_NEWROUTE,
              .nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, .nlmsg_seq = 5},
        .r = {.rtm_family = AF_INET, .rtm_table = RT_TABLE_MAIN},
    };
    CHECK(send(nl, &req, sizeof req, 0) == sizeof req);
    char buf[256];
    ssize_t n = recv(nl, buf, sizeof buf, 0);
    struct nlmsghdr *h = (struct nlmsghdr *)buf;
    CHECK(n >= (ssize_t)(sizeof *h + 4) && h->nlmsg_type == NLMSG_ERROR && h->nlmsg_seq == 5 &&
          ((struct nlmsgerr *)NLMSG_DATA(h))->error == -EPERM);
    CHECK(socket(AF_NETLINK, SOCK_RAW, NETLINK_KOBJECT_UEVENT) == -1);
    close(nl);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: abi DIR [confined]\n");
        return 2;
    }
    names(argv[1]);
    symlinks(argv[1]);
    sizes_and_scheduling(argv[1]);
    memfd();
    copies(argv[1]);
    residency();
    dual_stack();
    many_messages();
    interfaces(argc > 2 && !strcmp(argv[2], "confined"));
    DONE();
}
