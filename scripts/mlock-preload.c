/*
 * LD_PRELOAD helper: locks all current and future memory of the process it is loaded into
 * (mlockall(MCL_CURRENT | MCL_FUTURE)) and keeps the OOM killer away from it, before main runs.
 * scripts/attach --swap starts nbdfuse with it in the nbdfuse + loop fallback, because nbdfuse is
 * then in the swap path: a page of nbdfuse swapped out to the device it serves could never come
 * back. (nbd-client -swap and nbd-umemd serve --swap lock themselves.)
 * Set NBD_UMEMD_MLOCK_REQUIRED=1 to make a failed mlockall fatal.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

__attribute__((constructor)) static void umemd_lock_all(void) {
    if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0) {
        fprintf(stderr, "mlock-preload: mlockall failed: %s\n", strerror(errno));
        const char *req = getenv("NBD_UMEMD_MLOCK_REQUIRED");
        if (req && *req == '1') _exit(111);
    }
    FILE *f = fopen("/proc/self/oom_score_adj", "w");
    if (f) {
        fputs("-1000\n", f);
        fclose(f);
    }
}
