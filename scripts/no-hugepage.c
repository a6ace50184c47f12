/*
 * no-hugepage CMD [ARGS...]: runs CMD with madvise(MADV_HUGEPAGE) turned into a no-op failure
 * (EINVAL), through a seccomp filter installed before exec; nothing else changes.
 *
 * Why: QEMU marks all guest RAM MADV_HUGEPAGE. On a file-backed RAM mapping (memory-backend-file on
 * a block device) the kernel then reads ahead two whole PMDs (4 MiB) on every page fault, whatever
 * the device's read_ahead_kb. On an nbd-umemd device whose pages are still on a remote source, every
 * guest page fault would wait for 4 MiB to cross the link instead of one page. QEMU ignores a failed
 * madvise, so under this filter its RAM mapping faults page by page (plus the device's
 * read_ahead_kb), and transparent huge pages are simply not used.
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#else
#error "no-hugepage: unsupported architecture"
#endif

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fprintf(argc < 2 ? stderr : stdout,
                "usage: no-hugepage CMD [ARGS...]\n"
                "runs CMD with madvise(MADV_HUGEPAGE) failing (EINVAL), so that a file-backed guest RAM\n"
                "mapping on an nbd-umemd device faults page by page instead of 4 MiB at a time\n");
        return argc < 2 ? 2 : 0;
    }
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_madvise, 0, 3),
        /* the advice is an int: the low 32 bits of the third argument (little endian) */
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, MADV_HUGEPAGE, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EINVAL & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof(filter) / sizeof(filter[0]), .filter = filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        fprintf(stderr, "no-hugepage: PR_SET_NO_NEW_PRIVS failed: %s\n", strerror(errno));
        return 125;
    }
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        fprintf(stderr, "no-hugepage: cannot install the seccomp filter: %s\n", strerror(errno));
        return 125;
    }
    execvp(argv[1], argv + 1);
    fprintf(stderr, "no-hugepage: cannot run %s: %s\n", argv[1], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}
