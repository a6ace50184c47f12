/* delayproxy: the remote path of `scripts/bench --suite swap` (this kernel has no netem, and nbdkit's
 * delay filter only counts whole milliseconds). Accepts TCP connections and joins each to a new
 * connection to a Unix socket (the server); bytes from the client go through at once, bytes from the
 * server are held until DELAY_US microseconds after they arrived (a one-way delay line: replies,
 * and so every read, arrive that much later; pipelined replies keep their spacing).
 *
 * Usage: delayproxy LISTEN_IP PORT UNIX_SOCKET DELAY_US PIDFILE
 * Writes its pid to PIDFILE once it listens; runs until killed; one thread per direction per connection, plus a sender per connection.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)
#define MAX_QUEUED (64L << 20)

static const char *backend_path;
static long delay_ns;

struct chunk {
    struct chunk *next;
    struct timespec due;
    size_t len;
    char data[];
};

struct conn {
    int client, server;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct chunk *head, *tail;
    long queued;
    int eof;
};

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* client -> server, at once */
static void *up(void *arg) {
    struct conn *c = arg;
    char *buf = malloc(CHUNK);
    ssize_t n;
    while (buf && (n = read(c->client, buf, CHUNK)) > 0)
        if (write_all(c->server, buf, (size_t)n)) break;
    shutdown(c->server, SHUT_WR);
    free(buf);
    return NULL;
}

/* server -> queue, stamped */
static void *down_reader(void *arg) {
    struct conn *c = arg;
    for (;;) {
        struct chunk *k = malloc(sizeof *k + CHUNK);
        if (!k) break;
        ssize_t n = read(c->server, k->data, CHUNK);
        if (n <= 0) {
            free(k);
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &k->due);
        k->due.tv_nsec += delay_ns;
        k->due.tv_sec += k->due.tv_nsec / 1000000000L;
        k->due.tv_nsec %= 1000000000L;
        k->len = (size_t)n;
        k->next = NULL;
        pthread_mutex_lock(&c->lock);
        while (c->queued > MAX_QUEUED) pthread_cond_wait(&c->cond, &c->lock);
        if (c->tail) c->tail->next = k; else c->head = k;
        c->tail = k;
        c->queued += n;
        pthread_cond_broadcast(&c->cond);
        pthread_mutex_unlock(&c->lock);
    }
    pthread_mutex_lock(&c->lock);
    c->eof = 1;
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

/* queue -> client, when due */
static void *down_sender(void *arg) {
    struct conn *c = arg;
    prctl(PR_SET_TIMERSLACK, 1UL);
    for (;;) {
        pthread_mutex_lock(&c->lock);
        while (!c->head && !c->eof) pthread_cond_wait(&c->cond, &c->lock);
        struct chunk *k = c->head;
        if (!k) {
            pthread_mutex_unlock(&c->lock);
            break;
        }
        c->head = k->next;
        if (!c->head) c->tail = NULL;
        c->queued -= (long)k->len;
        pthread_cond_broadcast(&c->cond);
        pthread_mutex_unlock(&c->lock);
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &k->due, NULL) == EINTR) {}
        int bad = write_all(c->client, k->data, k->len);
        free(k);
        if (bad) break;
    }
    shutdown(c->client, SHUT_WR);
    return NULL;
}

static void *serve(void *arg) {
    struct conn *c = arg;
    pthread_t t[3];
    pthread_create(&t[0], NULL, up, c);
    pthread_create(&t[1], NULL, down_reader, c);
    pthread_create(&t[2], NULL, down_sender, c);
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    close(c->client);
    close(c->server);
    free(c);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: delayproxy LISTEN_IP PORT UNIX_SOCKET DELAY_US PIDFILE\n");
        return 2;
    }
    backend_path = argv[3];
    delay_ns = atol(argv[4]) * 1000L;
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_term);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 64)) {
        perror("delayproxy: listen");
        return 1;
    }
    FILE *pf = fopen(argv[5], "w");
    if (!pf || fprintf(pf, "%d\n", (int)getpid()) < 0 || fclose(pf)) {
        perror("delayproxy: pidfile");
        return 1;
    }
    for (;;) {
        int cl = accept(l, NULL, NULL);
        if (cl < 0) continue;
        setsockopt(cl, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int sv = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un u = {.sun_family = AF_UNIX};
        strncpy(u.sun_path, backend_path, sizeof u.sun_path - 1);
        if (sv < 0 || connect(sv, (struct sockaddr *)&u, sizeof u)) {
            perror("delayproxy: connect to the server");
            close(cl);
            if (sv >= 0) close(sv);
            continue;
        }
        struct conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(cl);
            close(sv);
            continue;
        }
        c->client = cl;
        c->server = sv;
        pthread_mutex_init(&c->lock, NULL);
        pthread_cond_init(&c->cond, NULL);
        pthread_t t;
        if (pthread_create(&t, NULL, serve, c) == 0) pthread_detach(t);
    }
}
