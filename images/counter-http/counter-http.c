/*
 * counter-http: a tiny single-threaded HTTP/1.1 server that counts requests.
 *
 *   counter-http [PORT]      (default 80, on 0.0.0.0)
 *
 * GET / (or HEAD /) answers 200 with the body "count=N\n", N counting every GET / so far,
 * this one included. Any other path is 404, any other method 405, a malformed request
 * 400 (and the connection is closed). Connections are kept alive (HTTP/1.1, or HTTP/1.0
 * with "Connection: keep-alive") unless the client sends "Connection: close"; pipelined
 * requests and requests split across reads work. SIGTERM (or SIGINT) ends it with status 0.
 *
 * GET /burn answers "burning", then computes for five seconds without a system call on
 * the way (the clock is read through the vDSO) and without taking connections: an app
 * that is busy though nobody connects, which a worker must not swap out as idle.
 *
 * The counter lives only in memory, so a snapshot that keeps the app's memory keeps it.
 * Only poll, accept, read and write do the work: no threads, no fork.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CONNS 256
#define IN_CAP 8192         /* request headers larger than this get 431 */
#define OUT_CAP 16384
#define OUT_HIGH 8192       /* stop reading requests while this much is unsent */
#define MAX_BODY (1 << 20)  /* request bodies larger than this get 413 */
#define MAX_DRAIN (1 << 20) /* input discarded before closing, at most */

struct conn {
    int fd;
    int peer_closed;  /* the client will send nothing more */
    int close_after;  /* close once the output is sent */
    int draining;     /* output sent and shut down: discarding input until the client closes */
    size_t drained;
    size_t in_len, out_len, out_off;
    size_t skip;      /* request body bytes still to discard */
    char in[IN_CAP];
    char out[OUT_CAP];
};

static struct conn *conns[MAX_CONNS];
static int nconns;
static unsigned long long count;
/* GET /burn asked for a burn, done once the response is on its way. */
static int burn_requested;
static int wake[2]; /* the signal handler writes here: the self-pipe trick */

static void on_signal(int sig) {
    int saved = errno;
    char c = (char)sig;
    if (write(wake[1], &c, 1) < 0) {
        /* The pipe is full: a wake-up is already pending. */
    }
    errno = saved;
}

static void set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0)
        fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static void append(struct conn *c, const char *data, size_t len) {
    if (len > OUT_CAP - c->out_len)
        len = OUT_CAP - c->out_len; /* cannot happen: OUT_HIGH leaves room */
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
}

/* Queues a response; HEAD responses carry the headers only. */
static void respond(struct conn *c, int status, const char *reason, const char *body,
                    int head) {
    char header[256];
    size_t body_len = strlen(body);
    int n = snprintf(header, sizeof header,
                     "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                     "Connection: %s\r\n\r\n",
                     status, reason, body_len, c->close_after ? "close" : "keep-alive");
    append(c, header, (size_t)n);
    if (!head)
        append(c, body, body_len);
}

/* Ends the connection after a response to a request that cannot be parsed. */
static void fail(struct conn *c, int status, const char *reason) {
    char body[64];
    snprintf(body, sizeof body, "%s\n", reason);
    c->close_after = 1;
    respond(c, status, reason, body, 0);
}

/* Whether the comma-separated header value contains token (case-insensitively). */
static int has_token(const char *value, size_t len, const char *token) {
    size_t tlen = strlen(token);
    for (size_t i = 0; i + tlen <= len; i++) {
        int starts = i == 0 || value[i - 1] == ',' || value[i - 1] == ' ';
        int ends = i + tlen == len || value[i + tlen] == ',' || value[i + tlen] == ' ' ||
                   value[i + tlen] == '\r';
        if (starts && ends && strncasecmp(value + i, token, tlen) == 0)
            return 1;
    }
    return 0;
}

/* Where the headers of the request at the start of buf end (just past the blank line),
 * or 0 when they have not all arrived. */
static size_t header_end(const char *buf, size_t len) {
    for (size_t i = 0; i < len; i++) {
        if (buf[i] != '\n')
            continue;
        if (i + 1 < len && buf[i + 1] == '\n')
            return i + 2;
        if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n')
            return i + 3;
    }
    return 0;
}

/* Parses the header lines after the request line; returns -1 if one is malformed. */
static int parse_headers(struct conn *c, const char *p, const char *end, int keep_alive,
                         long long *body) {
    *body = 0;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol)
            eol = end;
        size_t len = (size_t)(eol - p);
        if (len > 0 && p[len - 1] == '\r')
            len--;
        if (len == 0)
            break;
        const char *colon = memchr(p, ':', len);
        if (!colon || colon == p)
            return -1;
        size_t name_len = (size_t)(colon - p);
        const char *value = colon + 1;
        while (value < p + len && (*value == ' ' || *value == '\t'))
            value++;
        size_t value_len = (size_t)(p + len - value);
        if (name_len == 10 && strncasecmp(p, "connection", 10) == 0) {
            if (has_token(value, value_len, "close"))
                keep_alive = 0;
            else if (has_token(value, value_len, "keep-alive"))
                keep_alive = 1;
        } else if (name_len == 14 && strncasecmp(p, "content-length", 14) == 0) {
            if (value_len == 0 || value_len > 9)
                return -1;
            long long n = 0;
            for (size_t i = 0; i < value_len; i++) {
                if (value[i] < '0' || value[i] > '9')
                    return -1;
                n = n * 10 + (value[i] - '0');
            }
            *body = n;
        } else if (name_len == 17 && strncasecmp(p, "transfer-encoding", 17) == 0) {
            return -1; /* chunked request bodies are not supported */
        }
        p = eol + 1;
    }
    c->close_after = !keep_alive;
    return 0;
}

/* Handles the request whose headers are buf[0..len). */
static void handle(struct conn *c, const char *buf, size_t len) {
    const char *end = buf + len;
    const char *eol = memchr(buf, '\n', len);
    const char *sp1 = memchr(buf, ' ', (size_t)(eol - buf));
    const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1)) : NULL;
    if (!sp1 || !sp2 || sp1 == buf || sp2 == sp1 + 1) {
        fail(c, 400, "Bad Request");
        return;
    }
    const char *version = sp2 + 1;
    size_t version_len = (size_t)(eol - version);
    if (version_len > 0 && version[version_len - 1] == '\r')
        version_len--;
    int http11 = version_len == 8 && memcmp(version, "HTTP/1.1", 8) == 0;
    int http10 = version_len == 8 && memcmp(version, "HTTP/1.0", 8) == 0;
    long long body;
    if ((!http11 && !http10) || parse_headers(c, eol + 1, end, http11, &body) < 0) {
        fail(c, 400, "Bad Request");
        return;
    }
    if (body > MAX_BODY) {
        fail(c, 413, "Content Too Large");
        return;
    }
    c->skip = (size_t)body;
    size_t method_len = (size_t)(sp1 - buf);
    int head = method_len == 4 && memcmp(buf, "HEAD", 4) == 0;
    int get = method_len == 3 && memcmp(buf, "GET", 3) == 0;
    size_t target_len = (size_t)(sp2 - sp1 - 1);
    const char *target = sp1 + 1;
    int root = (target_len == 1 || target[1] == '?') && target[0] == '/';
    if (!get && !head) {
        respond(c, 405, "Method Not Allowed", "only GET and HEAD\n", 0);
    } else if (target_len == 5 && memcmp(target, "/burn", 5) == 0) {
        respond(c, 200, "OK", "burning\n", head);
        if (get)
            burn_requested = 1;
    } else if (!root) {
        respond(c, 404, "Not Found", "not found\n", head);
    } else {
        char text[64];
        if (get)
            count++;
        snprintf(text, sizeof text, "count=%llu\n", count);
        respond(c, 200, "OK", text, head);
    }
}

/* Handles every complete request in the input buffer. */
static void process(struct conn *c) {
    while (!c->close_after && c->out_len < OUT_HIGH) {
        if (c->skip > 0) {
            size_t n = c->skip < c->in_len ? c->skip : c->in_len;
            memmove(c->in, c->in + n, c->in_len - n);
            c->in_len -= n;
            c->skip -= n;
            if (c->skip > 0)
                return;
        }
        size_t blank = 0; /* empty lines before a request are ignored (RFC 9112 2.2) */
        while (blank < c->in_len && (c->in[blank] == '\r' || c->in[blank] == '\n'))
            blank++;
        memmove(c->in, c->in + blank, c->in_len - blank);
        c->in_len -= blank;
        size_t len = header_end(c->in, c->in_len);
        if (len == 0) {
            if (c->in_len == IN_CAP)
                fail(c, 431, "Request Header Fields Too Large");
            return;
        }
        handle(c, c->in, len);
        memmove(c->in, c->in + len, c->in_len - len);
        c->in_len -= len;
    }
}

/* Sends what it can; returns -1 when the connection is broken. */
static int flush(struct conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (n < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
        c->out_off += (size_t)n;
    }
    c->out_off = c->out_len = 0;
    return 0;
}

/* Discards input after the last response, so that closing with unread input (which
 * makes the kernel send a reset) cannot destroy the response on its way to the client. */
static int drain(struct conn *c) {
    char buf[4096];
    ssize_t n = read(c->fd, buf, sizeof buf);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
    c->drained += (size_t)n;
    return n == 0 || c->drained > MAX_DRAIN ? -1 : 0;
}

/* Reads, answers and sends; returns -1 when the connection should be closed. */
static int serve(struct conn *c, short revents) {
    if (c->draining)
        return drain(c);
    if (revents & (POLLIN | POLLHUP | POLLERR)) {
        if (!c->peer_closed && c->in_len < IN_CAP) {
            ssize_t n = read(c->fd, c->in + c->in_len, IN_CAP - c->in_len);
            if (n > 0)
                c->in_len += (size_t)n;
            else if (n == 0)
                c->peer_closed = 1;
            else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return -1;
        } else if (revents & (POLLHUP | POLLERR)) {
            return -1;
        }
    }
    /* Pipelined requests left waiting for room in the output are answered once it is
     * sent, without waiting for the client to send more. */
    do {
        process(c);
        if (flush(c) < 0)
            return -1;
    } while (c->out_len == 0 && !c->close_after && header_end(c->in, c->in_len) > 0);
    if (c->out_len == 0 && c->close_after && !c->peer_closed) {
        shutdown(c->fd, SHUT_WR);
        c->draining = 1;
        return 0;
    }
    if (c->out_len == 0 && (c->close_after || c->peer_closed))
        return -1;
    return 0;
}

static void accept_all(int listener) {
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0)
            return; /* EAGAIN, or a transient error such as EMFILE */
        struct conn *c = nconns < MAX_CONNS ? calloc(1, sizeof *c) : NULL;
        if (!c) {
            close(fd);
            continue;
        }
        set_nonblocking(fd);
        c->fd = fd;
        conns[nconns++] = c;
    }
}

/* Computes for five seconds (see GET /burn). */
static void burn(void) {
    burn_requested = 0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    volatile unsigned long sink = 0;
    do {
        for (int i = 0; i < 1000000; i++)
            sink += (unsigned long)i;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while (now.tv_sec - start.tv_sec < 5);
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        perror("counter-http: socket");
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 128) < 0) {
        perror("counter-http: bind/listen");
        return -1;
    }
    set_nonblocking(fd);
    return fd;
}

static int install_handlers(void) {
    if (pipe(wake) < 0)
        return -1;
    set_nonblocking(wake[0]);
    set_nonblocking(wake[1]);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 80;
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "usage: counter-http [PORT]\n");
        return 2;
    }
    if (install_handlers() < 0) {
        perror("counter-http: pipe");
        return 1;
    }
    int listener = listen_on(port);
    if (listener < 0)
        return 1;
    fprintf(stderr, "counter-http: listening on 0.0.0.0:%d\n", port);
    static struct pollfd fds[MAX_CONNS + 2];
    for (;;) {
        fds[0] = (struct pollfd){.fd = wake[0], .events = POLLIN};
        fds[1] = (struct pollfd){.fd = nconns < MAX_CONNS ? listener : -1, .events = POLLIN};
        for (int i = 0; i < nconns; i++) {
            struct conn *c = conns[i];
            short events = c->out_len > 0 ? POLLOUT : 0;
            if (c->draining ||
                (!c->peer_closed && !c->close_after && c->out_len < OUT_HIGH && c->in_len < IN_CAP))
                events |= POLLIN;
            fds[i + 2] = (struct pollfd){.fd = c->fd, .events = events};
        }
        int polled = nconns;
        if (poll(fds, (nfds_t)polled + 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            perror("counter-http: poll");
            return 1;
        }
        if (fds[0].revents & POLLIN)
            break;
        for (int i = 0; i < polled; i++) {
            if (fds[i + 2].revents && serve(conns[i], fds[i + 2].revents) < 0) {
                close(conns[i]->fd);
                free(conns[i]);
                conns[i] = NULL;
            }
        }
        int kept = 0;
        for (int i = 0; i < nconns; i++)
            if (conns[i])
                conns[kept++] = conns[i];
        nconns = kept;
        if (fds[1].revents & POLLIN)
            accept_all(listener);
        if (burn_requested)
            burn();
    }
    for (int i = 0; i < nconns; i++)
        close(conns[i]->fd);
    close(listener);
    fprintf(stderr, "counter-http: stopping after %llu requests\n", count);
    return 0;
}
