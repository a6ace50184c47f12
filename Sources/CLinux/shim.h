#ifndef NBD_UMEMD_CLINUX_SHIM_H
#define NBD_UMEMD_CLINUX_SHIM_H
#include <stddef.h>
#include <stdint.h>

/* Linux calls Swift's Glibc module hides (they need _GNU_SOURCE), declared as glibc exports them,
 * plus thin wrappers for variadic calls (ioctl) that Swift cannot import. */
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/ioctl.h>
#include <sys/vfs.h>

extern int fallocate(int fd, int mode, off_t offset, off_t len);
extern ssize_t preadv2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags);
extern ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags);
extern int memfd_create(const char *name, unsigned int flags);

enum {
    UMEMD_RWF_DSYNC = 0x02,
    UMEMD_RWF_NOWAIT = 0x08,
    UMEMD_FALLOC_FL_KEEP_SIZE = 0x01,
    UMEMD_FALLOC_FL_PUNCH_HOLE = 0x02,
    UMEMD_FALLOC_FL_ZERO_RANGE = 0x10,
    UMEMD_SEEK_DATA = 3,
    UMEMD_SEEK_HOLE = 4,
    UMEMD_MFD_CLOEXEC = 1,
};

static inline ssize_t umemd_pread_flags(int fd, void *buf, size_t count, off_t offset, int flags) {
    struct iovec v = { buf, count };
    return preadv2(fd, &v, 1, offset, flags);
}

static inline ssize_t umemd_pwrite_flags(int fd, const void *buf, size_t count, off_t offset, int flags) {
    struct iovec v = { (void *)buf, count };
    return pwritev2(fd, &v, 1, offset, flags);
}

/* BLKGETSIZE64 = _IOR(0x12, 114, size_t) */
static inline int umemd_block_device_size(int fd, uint64_t *size) {
    return ioctl(fd, 0x80081272UL, size);
}

/* statfs f_type of the file system holding fd, or 0 when unknown. */
static inline long umemd_fs_type(int fd) {
    struct statfs s;
    if (fstatfs(fd, &s) != 0) return 0;
    return (long)s.f_type;
}

/* Remote source (Sources/NbdPager/Remote): wake-up eventfd for the libnbd event threads. */
#include <sys/eventfd.h>
static inline int umemd_eventfd_create(void) {
    return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

/* Direct replies (Sources/NbdPager/Server/DirectReplyWriter.swift). */
#include <sys/socket.h>
#include <fcntl.h>

/* Bytes sent on a socket and not yet read by the peer (SIOCOUTQ), or -1. */
static inline int umemd_socket_outq(int fd) {
    int n = 0;
    if (ioctl(fd, 0x5411 /* SIOCOUTQ = TIOCOUTQ */, &n) != 0) return -1;
    return n;
}

/* A socket's send buffer size (SO_SNDBUF), or -1. */
static inline int umemd_socket_sndbuf(int fd) {
    int n = 0;
    socklen_t len = sizeof n;
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &n, &len) != 0) return -1;
    return n;
}

/* Bytes received on a socket and not yet read (FIONREAD), or -1. */
static inline int umemd_socket_inq(int fd) {
    int n = 0;
    if (ioctl(fd, 0x541B /* FIONREAD */, &n) != 0) return -1;
    return n;
}

/* One non-blocking send of two buffers, never raising SIGPIPE. */
static inline ssize_t umemd_send2(int fd, const void *a, size_t alen, const void *b, size_t blen) {
    struct iovec v[2] = { { (void *)a, alen }, { (void *)b, blen } };
    struct msghdr m = { 0 };
    m.msg_iov = v;
    m.msg_iovlen = blen > 0 ? 2 : 1;
    return sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
}

static inline int umemd_dup_cloexec(int fd) {
    return fcntl(fd, F_DUPFD_CLOEXEC, 0);
}

/* Swap mode (Sources/NbdPager/System/SwapSafety.swift). prctl is variadic, so it gets a wrapper. */
#include <sys/prctl.h>
#include <sys/mman.h>
#include <malloc.h>
enum {
    UMEMD_PR_SET_IO_FLUSHER = 57,
    UMEMD_PR_GET_IO_FLUSHER = 58,
    UMEMD_MCL_CURRENT = 1,
    UMEMD_MCL_FUTURE = 2,
    UMEMD_M_TRIM_THRESHOLD = -1,
    UMEMD_M_MMAP_THRESHOLD = -3,
    UMEMD_M_ARENA_MAX = -8,
};
#include <pthread.h>
extern int pthread_setattr_default_np(const pthread_attr_t *attr);
static inline int umemd_prctl(int option, unsigned long arg) {
    return prctl(option, arg, 0UL, 0UL, 0UL);
}

/* Staging (Sources/NbdPager/Swap/Stager.swift): MADV_PAGEOUT isolates only pages on the LRU, and a
 * page faulted in a moment ago can still sit in the per-CPU batch of the CPU that faulted it, which
 * madvise drains only on the CPU it runs on. So the fill and the pageout run pinned to one CPU. */
#include <unistd.h>
#include <sys/syscall.h>
/* The calling thread's CPU mask (1024 CPUs), 0 or -1. */
static inline int umemd_affinity_get(uint64_t mask[16]) {
    for (int i = 0; i < 16; i++) mask[i] = 0;
    return syscall(SYS_sched_getaffinity, 0, 16 * sizeof(uint64_t), mask) > 0 ? 0 : -1;
}
static inline int umemd_affinity_set(const uint64_t mask[16]) {
    return syscall(SYS_sched_setaffinity, 0, 16 * sizeof(uint64_t), mask) == 0 ? 0 : -1;
}
/* Pins the calling thread to one CPU, 0 or -1. */
static inline int umemd_affinity_pin(unsigned cpu) {
    uint64_t m[16] = { 0 };
    if (cpu >= 1024) return -1;
    m[cpu / 64] = 1ULL << (cpu % 64);
    return umemd_affinity_set(m);
}
/* The CPU the calling thread runs on, or -1. */
static inline int umemd_current_cpu(void) {
    unsigned cpu = 0;
    return syscall(SYS_getcpu, &cpu, NULL, NULL) == 0 ? (int)cpu : -1;
}

#endif
