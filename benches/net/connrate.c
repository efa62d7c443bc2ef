/*
 * benches/net/connrate.c: TCP connection rate, for the network benchmark
 * (benches/net/README.md). Built static (gcc -O2 -static) by run.sh, so the
 * same binary runs in every guest and in the sandbox.
 *
 *   connrate server PORT
 *       Listens on 0.0.0.0:PORT (backlog 1024) and, in one thread, accepts
 *       each connection and closes it at once (a FIN, no data). Runs until
 *       killed.
 *
 *   connrate client ADDR PORT SECONDS [PARALLEL]
 *       Opens TCP connections to ADDR:PORT one after the other, for SECONDS:
 *       socket, connect, read until the server's FIN (EOF), close. A
 *       connection counts when connect succeeded and EOF arrived; connect and
 *       read each time out after 5 s. Stops early after 20 failures in a row.
 *       With PARALLEL (1 to 64, default 1), that many threads do so at once,
 *       each one connection after the other. Prints one line:
 *         conns=N failed=F seconds=S rate=R p50_ms=A p99_ms=B max_ms=C first_error=E parallel=P
 *       where R = N / S (connections per second, all threads together) and
 *       the percentiles are of the time from socket() to EOF of each counted
 *       connection. Exit status 0 if at least one connection counted.
 *
 *   connrate probe ADDR PORT SECONDS
 *       Tries one connection per 0.5 s until one succeeds (exit 0) or SECONDS
 *       pass (exit 1): waits for the network to come up.
 *
 * The guest is the side that closes last, so no TIME_WAIT piles up in the
 * guest (it is on the server side, in the pod, one per connection).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_port(const char *s)
{
    char *end;
    long p = strtol(s, &end, 10);
    if (*end || p < 1 || p > 65535) {
        fprintf(stderr, "connrate: bad port %s\n", s);
        exit(2);
    }
    return (int)p;
}

static int server(int port)
{
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 1024) < 0) {
        perror("connrate server");
        return 1;
    }
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c >= 0)
            close(c);
        else if (errno != EINTR && errno != ECONNABORTED && errno != EMFILE)
            perror("connrate server: accept");
    }
}

/* One connection: socket, connect, read to EOF, close. Returns 0 or an errno
 * value (ETIMEDOUT for a read that saw no EOF in time, EPROTO for data). */
static int one_conn(const struct sockaddr_in *a)
{
    struct timeval tv = {.tv_sec = 5};
    char buf[64];
    int err = 0;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return errno;
    /* SO_SNDTIMEO bounds a blocking connect on Linux. */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (const struct sockaddr *)a, sizeof *a) < 0) {
        err = errno == EINPROGRESS ? ETIMEDOUT : errno;
    } else {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0)
            err = (errno == EAGAIN || errno == EWOULDBLOCK) ? ETIMEDOUT : errno;
        else if (n > 0)
            err = EPROTO;
    }
    close(fd);
    return err;
}

static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

/* One client thread: connections one after the other until `end`. */
struct worker {
    struct sockaddr_in addr;
    double end;
    size_t cap, n;
    double *lat;
    long failed;
    int first_err;
    pthread_t thread;
};

static void *work(void *arg)
{
    struct worker *w = arg;
    long in_a_row = 0;
    double t;
    while ((t = now()) < w->end && w->n < w->cap) {
        int err = one_conn(&w->addr);
        double t1 = now();
        if (err) {
            w->failed++;
            if (!w->first_err)
                w->first_err = err;
            if (++in_a_row >= 20)
                break;
            continue;
        }
        in_a_row = 0;
        w->lat[w->n++] = (t1 - t) * 1e3;
    }
    return NULL;
}

static int client(const char *addr, int port, double seconds, int probe, int parallel)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, addr, &a.sin_addr) != 1) {
        fprintf(stderr, "connrate: bad IPv4 address %s\n", addr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    if (probe) {
        double end = now() + seconds;
        int err = 0;
        do {
            err = one_conn(&a);
            if (!err)
                return 0;
            usleep(500000);
        } while (now() < end);
        fprintf(stderr, "connrate: %s:%d not reachable in %.0f s: %s\n", addr, port, seconds,
                strerror(err));
        return 1;
    }
    struct worker w[64];
    double t0 = now();
    for (int i = 0; i < parallel; i++) {
        w[i] = (struct worker){.addr = a, .end = t0 + seconds, .cap = 1 << 18};
        w[i].lat = malloc(w[i].cap * sizeof *w[i].lat);
        if (!w[i].lat || pthread_create(&w[i].thread, NULL, work, &w[i])) {
            fprintf(stderr, "connrate: cannot start client thread %d\n", i);
            return 1;
        }
    }
    size_t n = 0;
    long failed = 0;
    int first_err = 0;
    for (int i = 0; i < parallel; i++) {
        pthread_join(w[i].thread, NULL);
        n += w[i].n;
        failed += w[i].failed;
        if (!first_err)
            first_err = w[i].first_err;
    }
    double took = now() - t0;
    double *lat = malloc((n ? n : 1) * sizeof *lat);
    size_t k = 0;
    for (int i = 0; i < parallel; i++) {
        memcpy(lat + k, w[i].lat, w[i].n * sizeof *lat);
        k += w[i].n;
    }
    double p50 = 0, p99 = 0, max = 0;
    if (n) {
        qsort(lat, n, sizeof *lat, cmp_double);
        p50 = lat[n / 2];
        p99 = lat[(size_t)((n - 1) * 0.99)];
        max = lat[n - 1];
    }
    printf("conns=%zu failed=%ld seconds=%.2f rate=%.1f p50_ms=%.2f p99_ms=%.2f max_ms=%.2f "
           "first_error=%s parallel=%d\n",
           n, failed, took, n / took, p50, p99, max,
           first_err ? strerrorname_np(first_err) : "none", parallel);
    return n ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "server"))
        return server(parse_port(argv[2]));
    if ((argc == 5 || argc == 6) && !strcmp(argv[1], "client")) {
        int parallel = argc == 6 ? atoi(argv[5]) : 1;
        if (parallel < 1 || parallel > 64) {
            fprintf(stderr, "connrate: PARALLEL wants 1 to 64, not %s\n", argv[5]);
            return 2;
        }
        return client(argv[2], parse_port(argv[3]), atof(argv[4]), 0, parallel);
    }
    if (argc == 5 && !strcmp(argv[1], "probe"))
        return client(argv[2], parse_port(argv[3]), atof(argv[4]), 1, 1);
    fprintf(stderr, "usage: connrate server PORT | connrate client ADDR PORT SECONDS [PARALLEL]"
                    " | connrate probe ADDR PORT SECONDS\n");
    return 2;
}
