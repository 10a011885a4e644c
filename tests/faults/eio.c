/* A fault-injection layer for tests/faults.rs, loaded with LD_PRELOAD: after EIO_AFTER calls
 * of the wrapped functions on a file whose path contains EIO_PATH, every further call fails
 * with EIO (a disk that went bad). Wraps fsync, fdatasync, write and pwrite64. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static long budget = -2;

static int matches(int fd) {
    const char *want = getenv("EIO_PATH");
    char link[64], path[4096];
    ssize_t n;
    if (want == NULL) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return strstr(path, want) != NULL;
}

static int fail(int fd) {
    long left;
    if (!matches(fd)) return 0;
    left = __atomic_load_n(&budget, __ATOMIC_SEQ_CST);
    if (left == -2) {
        const char *s = getenv("EIO_AFTER");
        __atomic_store_n(&budget, s ? atol(s) : -1, __ATOMIC_SEQ_CST);
    }
    if (__atomic_load_n(&budget, __ATOMIC_SEQ_CST) < 0) return 0;
    if (__atomic_fetch_sub(&budget, 1, __ATOMIC_SEQ_CST) > 0) return 0;
    __atomic_store_n(&budget, 0, __ATOMIC_SEQ_CST);
    errno = EIO;
    return 1;
}

int fsync(int fd) {
    static int (*real)(int);
    if (fail(fd)) return -1;
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (fail(fd)) return -1;
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}

ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real)(int, const void *, size_t);
    if (fail(fd)) return -1;
    if (!real) real = dlsym(RTLD_NEXT, "write");
    return real(fd, buf, count);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (fail(fd)) return -1;
    if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
    return real(fd, buf, count, offset);
}
