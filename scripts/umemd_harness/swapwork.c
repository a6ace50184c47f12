/* swapwork: the workload of `scripts/bench --suite swap`, run inside a memory cgroup limited to a
 * part of its working set so that it swaps.
 *
 * Usage: swapwork MIB SEED
 *
 * Maps MIB of anonymous memory and runs these phases, printing one JSON line per phase on stdout:
 *   fill    writes every page (a pattern of its index and generation: every 8-byte word checkable)
 *   seq     reads and verifies every page in order
 *   rand    reads and verifies one random page per page of the set; the accesses that took a major
 *           fault are timed (swap-in latency with nothing else running)
 *   mixed   one random access per two pages of the set: half rewrite the page, half verify it
 *   write   a writer thread rewrites every page in order (each page dropped first, so the write
 *           faults in a fresh page and pushes another out: pure swap-out) while a reader thread
 *           verifies random pages and times its major faults (swap-in latency under swap-out)
 * Then it prints {"phase":"hold"} and waits for a line on stdin (the harness runs swapoff meanwhile),
 * verifies every page once more, prints {"phase":"final",...} and exits 0 when no word was wrong.
 * Each phase line has: seconds, pswpin, pswpout (from /proc/vmstat), major faults, errors, the time
 * tasks stalled on memory (/proc/pressure/memory "some", ms; machine-wide), and for the timed phases
 * the count, p50 and p99 of the timed swap-ins in microseconds.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint8_t *mem;
static size_t pages;
static _Atomic uint8_t *gen; /* each page's generation; 0xff while the writer replaces it */
static atomic_long errors;
static atomic_int writer_done;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long majflt(void) {
    struct rusage r;
    getrusage(RUSAGE_THREAD, &r);
    return r.ru_majflt;
}

static void vmstat(long *in, long *out) {
    FILE *f = fopen("/proc/vmstat", "r");
    char name[64];
    long v;
    *in = *out = 0;
    if (!f) return;
    while (fscanf(f, "%63s %ld", name, &v) == 2) {
        if (!strcmp(name, "pswpin")) *in = v;
        else if (!strcmp(name, "pswpout")) *out = v;
    }
    fclose(f);
}

/* Microseconds tasks have stalled on memory so far (PSI "some": reclaim, refaults, swap-in waits). */
static long long psi_some(void) {
    FILE *f = fopen("/proc/pressure/memory", "r");
    long long total = -1;
    if (!f) return -1;
    if (fscanf(f, "some avg10=%*f avg60=%*f avg300=%*f total=%lld", &total) != 1) total = -1;
    fclose(f);
    return total;
}

static uint64_t word(size_t page, unsigned g, size_t k) {
    return ((((uint64_t)page << 8) | g) * 0x9E3779B97F4A7C15ULL) ^ k;
}

static void write_page(size_t i, unsigned g) {
    uint64_t *p = (uint64_t *)(mem + i * PAGE);
    for (size_t k = 0; k < WORDS; k++) p[k] = word(i, g, k);
}

/* Words of page i that do not hold generation g. */
static long check_page(size_t i, unsigned g) {
    const volatile uint64_t *p = (const volatile uint64_t *)(mem + i * PAGE);
    long bad = 0;
    for (size_t k = 0; k < WORDS; k++) bad += p[k] != word(i, g, k);
    return bad;
}

static uint64_t rng_state;
static uint64_t rnd(uint64_t *s) { /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

struct lat {
    double *us;
    size_t n, cap;
};

static void lat_add(struct lat *l, double us) {
    if (l->n < l->cap) l->us[l->n++] = us;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(struct lat *l, double p) {
    if (!l->n) return 0;
    size_t i = (size_t)(p * (l->n - 1) + 0.5);
    return l->us[i];
}

/* One timed, verified read of a random page: the first word's load is timed, and counted as a
 * swap-in when it took a major fault. A page the writer replaced meanwhile is not verified. */
static void timed_read(uint64_t *s, struct lat *l) {
    size_t i = rnd(s) % pages;
    unsigned g = atomic_load(&gen[i]);
    if (g == 0xff) return;
    long f0 = majflt();
    double t0 = now();
    (void)*(volatile uint64_t *)(mem + i * PAGE);
    double t1 = now();
    if (majflt() != f0) lat_add(l, (t1 - t0) * 1e6);
    long bad = check_page(i, g);
    if (bad && atomic_load(&gen[i]) == g) atomic_fetch_add(&errors, bad);
}

struct phase {
    const char *name;
    double t0;
    long in0, out0, flt0, err0;
    long long psi0;
};

static void begin(struct phase *p, const char *name) {
    p->name = name;
    vmstat(&p->in0, &p->out0);
    p->flt0 = majflt();
    p->err0 = atomic_load(&errors);
    p->psi0 = psi_some();
    p->t0 = now();
}

static void end(struct phase *p, struct lat *l, long extra_majflt) {
    double t = now() - p->t0;
    long in, out;
    long long psi = psi_some();
    vmstat(&in, &out);
    printf("{\"phase\":\"%s\",\"seconds\":%.4f,\"pswpin\":%ld,\"pswpout\":%ld,\"majflt\":%ld,\"errors\":%ld",
           p->name, t, in - p->in0, out - p->out0, majflt() - p->flt0 + extra_majflt,
           atomic_load(&errors) - p->err0);
    if (psi >= 0 && p->psi0 >= 0) printf(",\"psi_some_ms\":%.1f", (psi - p->psi0) / 1000.0);
    if (l) {
        qsort(l->us, l->n, sizeof(double), cmp);
        printf(",\"timed\":%zu,\"p50_us\":%.1f,\"p99_us\":%.1f", l->n, pct(l, 0.5), pct(l, 0.99));
        l->n = 0;
    }
    printf("}\n");
    fflush(stdout);
}

struct reader_result {
    struct lat lat;
    long majflt;
    uint64_t seed;
};

static void *reader(void *arg) {
    struct reader_result *r = arg;
    long f0 = majflt();
    while (!atomic_load(&writer_done)) timed_read(&r->seed, &r->lat);
    r->majflt = majflt() - f0;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: swapwork MIB SEED\n");
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    rng_state = strtoull(argv[2], NULL, 10) | 1;
    pages = mib * 256;
    if (!pages) {
        fprintf(stderr, "swapwork: MIB must be positive\n");
        return 2;
    }
    mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    gen = calloc(pages, 1);
    struct lat lat = {calloc(pages, sizeof(double)), 0, pages};
    if (mem == MAP_FAILED || !gen || !lat.us) {
        perror("swapwork: allocation");
        return 1;
    }
    madvise(mem, pages * PAGE, MADV_NOHUGEPAGE);
    struct phase ph;

    begin(&ph, "fill");
    for (size_t i = 0; i < pages; i++) {
        write_page(i, 1);
        gen[i] = 1;
    }
    end(&ph, NULL, 0);

    begin(&ph, "seq");
    for (size_t i = 0; i < pages; i++) atomic_fetch_add(&errors, check_page(i, gen[i]));
    end(&ph, NULL, 0);

    begin(&ph, "rand");
    for (size_t n = 0; n < pages; n++) timed_read(&rng_state, &lat);
    end(&ph, &lat, 0);

    begin(&ph, "mixed");
    for (size_t n = 0; n < pages / 2; n++) {
        size_t i = rnd(&rng_state) % pages;
        if (rnd(&rng_state) & 1) {
            unsigned g = gen[i] % 200 + 1;
            write_page(i, g);
            gen[i] = g;
        } else {
            atomic_fetch_add(&errors, check_page(i, gen[i]));
        }
    }
    end(&ph, NULL, 0);

    begin(&ph, "write");
    struct reader_result rr = {{calloc(pages, sizeof(double)), 0, pages}, 0, rng_state ^ 0x5555};
    pthread_t th;
    if (!rr.lat.us || pthread_create(&th, NULL, reader, &rr)) {
        perror("swapwork: reader thread");
        return 1;
    }
    for (size_t i = 0; i < pages; i++) {
        unsigned g = gen[i] % 200 + 1;
        atomic_store(&gen[i], 0xff);
        madvise(mem + i * PAGE, PAGE, MADV_DONTNEED);
        write_page(i, g);
        atomic_store(&gen[i], g);
    }
    atomic_store(&writer_done, 1);
    pthread_join(th, NULL);
    end(&ph, &rr.lat, rr.majflt);

    printf("{\"phase\":\"hold\"}\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;

    begin(&ph, "final");
    for (size_t i = 0; i < pages; i++) atomic_fetch_add(&errors, check_page(i, gen[i]));
    end(&ph, NULL, 0);
    return atomic_load(&errors) ? 3 : 0;
}
