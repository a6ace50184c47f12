/*
 * nbd-mmap: map a block device or file (or anonymous memory) and touch, write or verify its pages
 * in a given order. Used by the wiring demos and tests, on the host and inside the test VM (it is
 * built static so that it runs from a busybox initramfs).
 *
 *   nbd-mmap check PATH (--expect-file IMG | --expect-pattern SEED) [--shared|--private]
 *                  [--pages LIST | --all] [--page-size N] [--readahead]
 *       Maps PATH and compares each listed page with the same page of IMG, or with the generated
 *       pattern, in the order given. Without --readahead the mapping is MADV_RANDOM, so each fault
 *       reads exactly one page from the device.
 *   nbd-mmap write PATH --pattern SEED (--pages LIST | --all) [--page-size N]
 *       Maps PATH with MAP_SHARED, writes the pattern into the listed pages, msync(MS_SYNC)s.
 *   nbd-mmap fill PATH --size SIZE --pattern SEED [--page-size N]
 *       Creates (or truncates) the regular file PATH with SIZE bytes of the pattern (an image).
 *   nbd-mmap work --size SIZE [--seed SEED] [--report-ms MS] [--seconds N]
 *       A memory workload that never stops verifying: SIZE bytes of private anonymous memory, every
 *       page holding the pattern of its current generation (word 2). It visits the pages in a fixed
 *       scattered order, checks each against its expected generation, then rewrites it with the next
 *       one. Every MS milliseconds (default 500) it prints
 *       "WORK t=SECONDS ops=TOTAL rate=OPS/S errors=N" (one op = one 4 KiB page verified and
 *       rewritten); a wrong page prints "WORK-ERROR ...". Runs N seconds (default: forever).
 *   nbd-mmap anon --size SIZE [--seed SEED] [--passes N] [--wait-file PATH]
 *       Writes the pattern into SIZE bytes of private anonymous memory, then verifies it N times
 *       (default 1). With --wait-file it prints "READY", waits until PATH exists and verifies once
 *       more, so a test can change the system (swapoff) while the memory is held.
 *
 * LIST is comma-separated page indexes and ranges: "7,1,6,2,0,5,3,4" or "0-99,200".
 * SIZE takes K, M and G suffixes (powers of 1024).
 * The pattern: word 0 of page P is 0x4e42444d4d415000 + (SEED & 0xff), word 1 is P, every other
 * 64-bit word is a splitmix64 hash of (SEED, P, word index); a page in the wrong place or a stale
 * page from another seed does not verify.
 *
 * Output: one line per page for check/write ("page 7 ok"), and a final line that starts with
 * "VERDICT <mode> ok" or "VERDICT <mode> FAIL", which hosts grep on a serial console.
 * Exit status: 0 when everything verified, 1 on a mismatch, 2 on a usage or system error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *mode_name = "?";

static void usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "nbd-mmap: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(run nbd-mmap --help for usage)\n");
    printf("VERDICT %s FAIL usage\n", mode_name);
    exit(2);
}

static void sys_error(const char *what, const char *path) {
    fprintf(stderr, "nbd-mmap: %s %s: %s\n", what, path, strerror(errno));
    printf("VERDICT %s FAIL %s %s: %s\n", mode_name, what, path, strerror(errno));
    exit(2);
}

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t pattern_word(uint64_t seed, uint64_t page, uint64_t word) {
    if (word == 0) return 0x4e42444d4d415000ULL + (seed & 0xff);
    if (word == 1) return page;
    return splitmix64((seed << 40) ^ (page << 12) ^ word);
}

static void fill_page(uint64_t *p, size_t page_size, uint64_t seed, uint64_t page) {
    for (size_t w = 0; w < page_size / 8; w++) p[w] = pattern_word(seed, page, w);
}

/* Returns the index of the first wrong word, or -1. */
static long check_page(const uint64_t *p, size_t page_size, uint64_t seed, uint64_t page) {
    for (size_t w = 0; w < page_size / 8; w++)
        if (p[w] != pattern_word(seed, page, w)) return (long)w;
    return -1;
}

static uint64_t parse_size(const char *s) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s) usage_error("not a size: %s", s);
    switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    default: break;
    }
    if (*end == 'i' || *end == 'B') end++;
    if (*end == 'B') end++;
    if (*end != '\0') usage_error("not a size: %s", s);
    return v;
}

/* Parses LIST into *out (malloc'd); returns the count. */
static size_t parse_pages(const char *list, uint64_t **out) {
    size_t cap = 64, n = 0;
    uint64_t *v = malloc(cap * sizeof *v);
    if (!v) sys_error("malloc", "page list");
    const char *s = list;
    while (*s) {
        char *end;
        errno = 0;
        unsigned long long a = strtoull(s, &end, 10), b;
        if (errno || end == s) usage_error("bad page list: %s", list);
        b = a;
        if (*end == '-') {
            s = end + 1;
            b = strtoull(s, &end, 10);
            if (errno || end == s || b < a) usage_error("bad page list: %s", list);
        }
        for (unsigned long long i = a; i <= b; i++) {
            if (n == cap) {
                cap *= 2;
                v = realloc(v, cap * sizeof *v);
                if (!v) sys_error("malloc", "page list");
            }
            v[n++] = i;
        }
        if (*end == ',') end++;
        else if (*end != '\0') usage_error("bad page list: %s", list);
        s = end;
    }
    if (n == 0) usage_error("empty page list: %s", list);
    *out = v;
    return n;
}

static uint64_t path_size(int fd, const char *path) {
    struct stat st;
    if (fstat(fd, &st) < 0) sys_error("stat", path);
    if (S_ISBLK(st.st_mode)) {
        uint64_t sz;
        if (ioctl(fd, BLKGETSIZE64, &sz) < 0) sys_error("BLKGETSIZE64", path);
        return sz;
    }
    return (uint64_t)st.st_size;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct opts {
    const char *path, *expect_file, *pages, *wait_file;
    int have_seed, shared, all, readahead;
    uint64_t seed, size, page_size, passes, report_ms, seconds;
};

/* The work pattern: word 0 magic, word 1 page, word 2 generation, the rest a hash of all three. */
static uint64_t work_word(uint64_t seed, uint64_t page, uint64_t gen, uint64_t word) {
    if (word == 0) return 0x4e42444d574f524bULL ^ (seed & 0xff);
    if (word == 1) return page;
    if (word == 2) return gen;
    return splitmix64((seed << 40) ^ (page << 12) ^ word ^ (gen * 0x9e3779b97f4a7c15ULL));
}

static int run_work(struct opts *o) {
    if (!o->size) usage_error("%s needs --size", "work");
    size_t ps = o->page_size, npages = o->size / ps, words = ps / 8;
    uint64_t *mem = mmap(NULL, npages * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *gen = calloc(npages, sizeof *gen);
    if (mem == MAP_FAILED || !gen) sys_error("mmap", "work memory");
    for (size_t p = 0; p < npages; p++)
        for (size_t w = 0; w < words; w++) mem[p * words + w] = work_word(o->seed, p, 0, w);
    /* a stride coprime with npages visits every page once per round, scattered */
    size_t stride = npages > 7919 ? 7919 : 1;
    while (stride > 1 && npages % stride == 0) stride--;
    double start = now_s(), last = start, report = (o->report_ms ? o->report_ms : 500) / 1000.0;
    uint64_t ops = 0, last_ops = 0, errors = 0;
    size_t p = 0;
    printf("WORK start pages=%zu MiB=%" PRIu64 "\n", npages, o->size >> 20);
    for (;;) {
        for (int k = 0; k < 256; k++) {
            uint64_t *pg = mem + p * words, g = gen[p];
            for (size_t w = 0; w < words; w++) {
                if (pg[w] != work_word(o->seed, p, g, w)) {
                    errors++;
                    if (errors <= 20)
                        printf("WORK-ERROR page=%zu word=%zu gen=%" PRIu64 " expected=%016" PRIx64 " got=%016" PRIx64 "\n",
                               p, w, g, work_word(o->seed, p, g, w), pg[w]);
                    break;
                }
            }
            g++;
            for (size_t w = 0; w < words; w++) pg[w] = work_word(o->seed, p, g, w);
            gen[p] = g;
            ops++;
            p = (p + stride) % npages;
        }
        double t = now_s();
        if (t - last >= report) {
            printf("WORK t=%.2f ops=%" PRIu64 " rate=%.0f errors=%" PRIu64 "\n", t - start, ops, (ops - last_ops) / (t - last), errors);
            last = t;
            last_ops = ops;
            if (o->seconds && t - start >= (double)o->seconds) break;
        }
    }
    printf("VERDICT work %s ops=%" PRIu64 " errors=%" PRIu64 "\n", errors ? "FAIL" : "ok", ops, errors);
    return errors ? 1 : 0;
}

static int run_anon(struct opts *o) {
    if (!o->size) usage_error("%s needs --size", "anon");
    size_t ps = o->page_size, npages = o->size / ps;
    uint64_t *mem = mmap(NULL, npages * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) sys_error("mmap", "anonymous memory");
    double t0 = now_s();
    for (size_t p = 0; p < npages; p++) fill_page(mem + p * ps / 8, ps, o->seed, p);
    printf("anon: wrote %zu pages (%" PRIu64 " MiB) in %.2f s\n", npages, o->size >> 20, now_s() - t0);
    fflush(stdout);
    uint64_t total = o->passes + (o->wait_file ? 1 : 0);
    for (uint64_t pass = 1; pass <= total; pass++) {
        if (o->wait_file && pass == total) {
            printf("READY\n");
            fflush(stdout);
            while (access(o->wait_file, F_OK) != 0) usleep(50000);
        }
        /* the memory escapes here: the verify loop must really load every word */
        __asm__ __volatile__("" : : "r"(mem) : "memory");
        t0 = now_s();
        for (size_t p = 0; p < npages; p++) {
            long w = check_page(mem + p * ps / 8, ps, o->seed, p);
            if (w >= 0) {
                printf("VERDICT anon FAIL pass=%" PRIu64 " page=%zu word=%ld expected=%016" PRIx64 " got=%016" PRIx64 "\n",
                       pass, p, w, pattern_word(o->seed, p, w), mem[p * ps / 8 + w]);
                return 1;
            }
        }
        printf("anon: pass %" PRIu64 " verified %zu pages in %.2f s\n", pass, npages, now_s() - t0);
        fflush(stdout);
    }
    printf("VERDICT anon ok pages=%zu passes=%" PRIu64 "\n", npages, total);
    return 0;
}

static int run_fill(struct opts *o) {
    if (!o->size || !o->have_seed) usage_error("%s needs --size and --pattern", "fill");
    int fd = open(o->path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) sys_error("open", o->path);
    uint64_t *page = malloc(o->page_size);
    if (!page) sys_error("malloc", "page");
    for (uint64_t p = 0; p < o->size / o->page_size; p++) {
        fill_page(page, o->page_size, o->seed, p);
        if (pwrite(fd, page, o->page_size, (off_t)(p * o->page_size)) != (ssize_t)o->page_size) sys_error("write", o->path);
    }
    if (fsync(fd) < 0 || close(fd) < 0) sys_error("fsync", o->path);
    printf("VERDICT fill ok pages=%" PRIu64 "\n", o->size / o->page_size);
    return 0;
}

static int run_map(struct opts *o, int writing) {
    if (!o->have_seed && !o->expect_file)
        usage_error("%s needs --expect-pattern SEED or --expect-file IMG", mode_name);
    if (!o->pages && !o->all) usage_error("%s needs --pages LIST or --all", mode_name);
    int fd = open(o->path, writing || o->shared ? O_RDWR : O_RDONLY);
    if (fd < 0 && !writing && errno == EACCES) fd = open(o->path, O_RDONLY);
    if (fd < 0) sys_error("open", o->path);
    uint64_t size = path_size(fd, o->path), ps = o->page_size, npages_dev = size / ps;
    uint64_t *pages = NULL;
    size_t n;
    if (o->all) {
        n = npages_dev;
        pages = malloc((n ? n : 1) * sizeof *pages);
        if (!pages) sys_error("malloc", "page list");
        for (size_t i = 0; i < n; i++) pages[i] = i;
    } else {
        n = parse_pages(o->pages, &pages);
    }
    for (size_t i = 0; i < n; i++) {
        if (pages[i] >= npages_dev) {
            fprintf(stderr, "nbd-mmap: page %" PRIu64 " is past the end of %s (%" PRIu64 " pages)\n", pages[i], o->path, npages_dev);
            printf("VERDICT %s FAIL page %" PRIu64 " out of range\n", mode_name, pages[i]);
            return 2;
        }
    }
    int img = -1;
    if (o->expect_file) {
        img = open(o->expect_file, O_RDONLY);
        if (img < 0) sys_error("open", o->expect_file);
    }
    int shared = writing || o->shared;
    int prot = PROT_READ | (writing ? PROT_WRITE : 0);
    uint8_t *map = mmap(NULL, size, prot, shared ? MAP_SHARED : MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) sys_error("mmap", o->path);
    if (!o->readahead && madvise(map, size, MADV_RANDOM) < 0) sys_error("madvise", o->path);
    uint8_t *want = malloc(ps);
    if (!want) sys_error("malloc", "page");
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t p = pages[i];
        uint8_t *at = map + p * ps;
        if (writing) {
            fill_page((uint64_t *)want, ps, o->seed, p);
            memcpy(at, want, ps);
            printf("page %" PRIu64 " written\n", p);
            continue;
        }
        if (img >= 0) {
            ssize_t r = pread(img, want, ps, (off_t)(p * ps));
            if (r < 0) sys_error("read", o->expect_file);
            if ((uint64_t)r < ps) memset(want + r, 0, ps - r);
        } else {
            fill_page((uint64_t *)want, ps, o->seed, p);
        }
        if (memcmp(at, want, ps) == 0) {
            if (n <= 64) printf("page %" PRIu64 " ok\n", p);
        } else {
            size_t off = 0;
            while (off < ps && at[off] == want[off]) off++;
            printf("page %" PRIu64 " MISMATCH at byte %zu: expected %02x got %02x\n", p, off, want[off], at[off]);
            bad++;
        }
        fflush(stdout);
    }
    if (writing && msync(map, size, MS_SYNC) < 0) sys_error("msync", o->path);
    munmap(map, size);
    close(fd);
    if (bad) {
        printf("VERDICT %s FAIL %zu of %zu pages wrong (%s)\n", mode_name, bad, n, shared ? "MAP_SHARED" : "MAP_PRIVATE");
        return 1;
    }
    printf("VERDICT %s ok pages=%zu %s\n", mode_name, n, shared ? "MAP_SHARED" : "MAP_PRIVATE");
    return 0;
}

static void help(void) {
    puts("usage:\n"
         "  nbd-mmap check PATH (--expect-file IMG | --expect-pattern SEED) [--shared|--private]\n"
         "                 [--pages LIST | --all] [--page-size N] [--readahead]\n"
         "  nbd-mmap write PATH --pattern SEED (--pages LIST | --all) [--page-size N]\n"
         "  nbd-mmap fill PATH --size SIZE --pattern SEED [--page-size N]\n"
         "  nbd-mmap anon --size SIZE [--seed SEED] [--passes N] [--wait-file PATH]\n"
         "  nbd-mmap work --size SIZE [--seed SEED] [--report-ms MS] [--seconds N]\n"
         "LIST: page indexes and ranges in touch order, e.g. 7,1,6,2,0,5,3,4 or 0-99,200.\n"
         "The last output line starts with 'VERDICT <mode> ok' or 'VERDICT <mode> FAIL'.\n"
         "Exit status: 0 verified, 1 mismatch, 2 usage or system error.");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        help();
        return argc < 2 ? 2 : 0;
    }
    mode_name = argv[1];
    struct opts o = {.page_size = 4096, .passes = 1, .seed = 1};
    int i = 2;
    if (strcmp(mode_name, "anon") != 0 && strcmp(mode_name, "work") != 0) {
        if (argc < 3 || argv[2][0] == '-') usage_error("%s needs a PATH", mode_name);
        o.path = argv[2];
        i = 3;
    }
    for (; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV() do { if (!v) usage_error("%s needs a value", a); i++; } while (0)
        if (!strcmp(a, "--shared")) o.shared = 1;
        else if (!strcmp(a, "--private")) o.shared = 0;
        else if (!strcmp(a, "--all")) o.all = 1;
        else if (!strcmp(a, "--readahead")) o.readahead = 1;
        else if (!strcmp(a, "--pages")) { NEEDV(); o.pages = v; }
        else if (!strcmp(a, "--expect-file")) { NEEDV(); o.expect_file = v; }
        else if (!strcmp(a, "--expect-pattern") || !strcmp(a, "--pattern") || !strcmp(a, "--seed")) {
            NEEDV(); o.seed = parse_size(v); o.have_seed = 1;
        }
        else if (!strcmp(a, "--size")) { NEEDV(); o.size = parse_size(v); }
        else if (!strcmp(a, "--page-size")) { NEEDV(); o.page_size = parse_size(v); }
        else if (!strcmp(a, "--passes")) { NEEDV(); o.passes = parse_size(v); }
        else if (!strcmp(a, "--wait-file")) { NEEDV(); o.wait_file = v; }
        else if (!strcmp(a, "--report-ms")) { NEEDV(); o.report_ms = parse_size(v); }
        else if (!strcmp(a, "--seconds")) { NEEDV(); o.seconds = parse_size(v); }
        else usage_error("unknown option %s", a);
#undef NEEDV
    }
    if (o.page_size < 16 || o.page_size % 8) usage_error("bad --page-size %s", "(must be a multiple of 8, at least 16)");
    if (!strcmp(mode_name, "anon")) return run_anon(&o);
    if (!strcmp(mode_name, "work")) return run_work(&o);
    if (!strcmp(mode_name, "fill")) return run_fill(&o);
    if (!strcmp(mode_name, "check")) return run_map(&o, 0);
    if (!strcmp(mode_name, "write")) return run_map(&o, 1);
    usage_error("unknown mode %s (check, write, fill, anon, work)", mode_name);
    return 2;
}
