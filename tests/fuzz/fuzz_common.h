// Shared by the libFuzzer harnesses: the readers under test take a path, so each input is
// written to an in-memory file (memfd) and read back through /proc/self/fd/N. No disk I/O,
// no files left behind, and the readers run exactly as they do on a real file.
#ifndef KD_FUZZ_COMMON_H
#define KD_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define FUZZ_CHECK(cond) do { if (!(cond)) {                                                    \
    fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); abort(); } } while (0)

// A memfd holding exactly the n bytes given; *path receives its /proc name. One per slot,
// created on first use and rewritten for each input.
static int fuzz_memfile(int slot, const uint8_t * data, size_t n, char path[64]) {
    static int fds[4] = { -1, -1, -1, -1 };
    if (fds[slot] < 0) {
        fds[slot] = memfd_create("kdcore-fuzz", MFD_CLOEXEC);
        FUZZ_CHECK(fds[slot] >= 0);
    }
    int fd = fds[slot];
    FUZZ_CHECK(ftruncate(fd, 0) == 0);
    size_t off = 0;
    while (off < n) {
        ssize_t w = pwrite(fd, data + off, n - off, (off_t)off);
        FUZZ_CHECK(w > 0);
        off += (size_t)w;
    }
    snprintf(path, 64, "/proc/self/fd/%d", fd);
    return fd;
}

#endif
