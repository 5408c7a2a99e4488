// The raw patterns that TabSync is measured against, the physical limits of "one file shared by
// processes", with no checksum and no encoding:
// - rename (the default): flock, read the state, write a temporary file, rename it over the
//   state, and let readers wake up through inotify IN_MOVED_TO (or poll with stat);
// - append-only log (--log): flock, pwrite one 16-byte record (seq, stamp) at the end, and let
//   readers wake up through inotify IN_MODIFY and pread from their own offset.
//
// Roles (the same as tabsync-bench's, see Benchmarks/README.md):
//   raw writer     --dir D --ack FIFO --readers N --changes K [--fsync] [--gap-us MAX]
//   raw reader     --dir D --ack FIFO --changes K --out FILE      (inotify)
//   raw poller     --dir D --ack FIFO --changes K --out FILE      (stat every 100 ms)
//   raw idle       --dir D [--poll]                               (watch until killed)
//   raw throughput --dir D --start-at MONO_NS --seconds S [--fsync]
// (each with --log for the append-only log). A reader also writes its CPU time to FILE.cpu.
//
// The state file holds one line, "SEQ STAMP\n", where STAMP is CLOCK_MONOTONIC in
// nanoseconds taken just before the commit. A reader's sample is its delivery time minus STAMP.
// --changes counts every change, warm-up included; the driver drops the warm-up samples.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define STATE "raw.state"
#define TEMP "raw.state.tmp"
#define LOCK "raw.lock"
#define LOG "raw.log"

static const char *dir, *ack_path, *out_path;
static long readers = 1, changes = 0, seconds = 0, gap_us = 0;
static int64_t start_at = 0;
static int do_fsync = 0, do_poll = 0, do_log = 0;

static void die(const char *what) {
    fprintf(stderr, "raw: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_ns(int64_t ns) {
    struct timespec ts = {ns / 1000000000, ns % 1000000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

static void write_all(int fd, const void *data, size_t size) {
    const char *p = data;
    while (size > 0) {
        ssize_t n = write(fd, p, size);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        p += n;
        size -= (size_t)n;
    }
}

static void read_exact(int fd, void *data, size_t size) {
    char *p = data;
    while (size > 0) {
        ssize_t n = read(fd, p, size);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("read");
        }
        if (n == 0) {
            fprintf(stderr, "raw: unexpected end of the ack pipe\n");
            exit(1);
        }
        p += n;
        size -= (size_t)n;
    }
}

/// Reads the state file: returns 0 and fills seq/stamp, or -1 when it is missing.
static int read_state(int dirfd, uint64_t *seq, int64_t *stamp) {
    int fd = openat(dirfd, STATE, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) return -1;
        die("open state");
    }
    char buffer[128];
    ssize_t n = read(fd, buffer, sizeof buffer - 1);
    close(fd);
    if (n < 0) die("read state");
    buffer[n] = 0;
    if (sscanf(buffer, "%" SCNu64 " %" SCNd64, seq, stamp) != 2) return -1;
    return 0;
}

/// One commit: lock, read the current sequence, write the next generation, rename, unlock.
static uint64_t commit(int dirfd, int lockfd) {
    int64_t stamp = now_ns();
    while (flock(lockfd, LOCK_EX) != 0) {
        if (errno != EINTR) die("flock");
    }
    uint64_t seq = 0;
    int64_t old;
    if (read_state(dirfd, &seq, &old) != 0) seq = 0;
    seq += 1;
    char line[64];
    int length = snprintf(line, sizeof line, "%" PRIu64 " %" PRId64 "\n", seq, stamp);
    int fd = openat(dirfd, TEMP, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) die("open temp");
    write_all(fd, line, (size_t)length);
    if (do_fsync && fsync(fd) != 0) die("fsync");
    close(fd);
    if (renameat(dirfd, TEMP, dirfd, STATE) != 0) die("rename");
    flock(lockfd, LOCK_UN);
    return seq;
}

/// One commit to the log: lock, one record at the end, (fdatasync), unlock.
static uint64_t commit_log(int logfd, int lockfd) {
    int64_t stamp = now_ns();
    while (flock(lockfd, LOCK_EX) != 0) {
        if (errno != EINTR) die("flock");
    }
    struct stat info;
    if (fstat(logfd, &info) != 0) die("fstat log");
    int64_t record[2] = {info.st_size / 16 + 1, stamp};
    if (pwrite(logfd, record, sizeof record, info.st_size) != (ssize_t)sizeof record) die("pwrite");
    if (do_fsync && fdatasync(logfd) != 0) die("fdatasync");
    flock(lockfd, LOCK_UN);
    return (uint64_t)record[0];
}

static int open_log(int dirfd) {
    int fd = openat(dirfd, LOG, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) die("open log");
    return fd;
}

static void write_cpu(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    int64_t ns = ((int64_t)usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000000000LL
        + ((int64_t)usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) * 1000;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s.cpu", out_path);
    FILE *out = fopen(path, "w");
    if (!out) die("open cpu");
    fprintf(out, "%" PRId64 "\n", ns);
    fclose(out);
}

static int open_dir(void) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) die("open dir");
    return fd;
}

static int open_lock(int dirfd) {
    int fd = openat(dirfd, LOCK, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) die("open lock");
    return fd;
}

static int role_writer(void) {
    int dirfd = open_dir(), lockfd = open_lock(dirfd);
    int ack = open(ack_path, O_RDWR | O_CLOEXEC);
    if (ack < 0) die("open ack");
    char *bytes = malloc((size_t)readers);
    read_exact(ack, bytes, (size_t)readers);  // every reader is watching
    int logfd = do_log ? open_log(dirfd) : -1;
    for (long i = 0; i < changes; i++) {
        if (do_log) commit_log(logfd, lockfd); else commit(dirfd, lockfd);
        read_exact(ack, bytes, (size_t)readers);  // every reader delivered it
        // A random pause, so that a polling reader's 100 ms ticks do not lock on to the commits.
        if (gap_us > 0) sleep_ns((int64_t)(random() % (gap_us + 1)) * 1000);
    }
    return 0;
}

/// Records one delivery; returns the number recorded so far.
static long deliver(int64_t *samples, long count, int64_t stamp, int ack) {
    samples[count] = now_ns() - stamp;
    char byte = 1;
    write_all(ack, &byte, 1);
    return count + 1;
}

static void write_samples(const int64_t *samples, long count) {
    FILE *out = fopen(out_path, "w");
    if (!out) die("open out");
    for (long i = 0; i < count; i++) fprintf(out, "%" PRId64 "\n", samples[i]);
    fclose(out);
}

/// Opens the ack pipe and says "watching" (after the starting state was read, so that no
/// change can fall between the two).
static int open_ack_ready(void) {
    if (!ack_path) return -1;
    int ack = open(ack_path, O_WRONLY | O_CLOEXEC);
    if (ack < 0) die("open ack");
    char byte = 0;
    write_all(ack, &byte, 1);
    return ack;
}

/// Reads the next batch of inotify events; returns whether one of them names `name`.
static int wait_for_event(int inotify, const char *name) {
    char events[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    ssize_t n;
    while ((n = read(inotify, events, sizeof events)) < 0) {
        if (errno != EINTR) die("read inotify");
    }
    int relevant = 0;
    for (char *p = events; p < events + n;) {
        struct inotify_event *event = (struct inotify_event *)p;
        if (event->len > 0 && strcmp(event->name, name) == 0) relevant = 1;
        p += sizeof(struct inotify_event) + event->len;
    }
    return relevant;
}

/// The log reader: wakes at IN_MODIFY and reads the records after its offset.
static int role_log_reader(void) {
    int dirfd = open_dir(), logfd = open_log(dirfd);
    int inotify = inotify_init1(IN_CLOEXEC);
    if (inotify < 0) die("inotify_init1");
    if (inotify_add_watch(inotify, dir, IN_MODIFY) < 0) die("inotify_add_watch");
    int64_t *samples = calloc((size_t)(changes > 0 ? changes : 1), sizeof(int64_t));
    long count = 0;
    struct stat info;
    if (fstat(logfd, &info) != 0) die("fstat log");
    off_t offset = info.st_size - info.st_size % 16;
    int ack = open_ack_ready();
    int64_t records[256][2];
    while (changes == 0 || count < changes) {
        if (!wait_for_event(inotify, LOG) || changes == 0) continue;
        for (;;) {
            ssize_t got = pread(logfd, records, sizeof records, offset);
            if (got < 0) die("pread");
            long complete = got / 16;
            for (long i = 0; i < complete && count < changes; i++) count = deliver(samples, count, records[i][1], ack);
            offset += complete * 16;
            if (got < (ssize_t)sizeof records) break;
        }
    }
    write_samples(samples, count);
    write_cpu();
    return 0;
}

static int role_reader(void) {
    if (do_log) return role_log_reader();
    int dirfd = open_dir();
    int inotify = inotify_init1(IN_CLOEXEC);
    if (inotify < 0) die("inotify_init1");
    if (inotify_add_watch(inotify, dir, IN_MOVED_TO) < 0) die("inotify_add_watch");
    int64_t *samples = calloc((size_t)(changes > 0 ? changes : 1), sizeof(int64_t));
    long count = 0;
    uint64_t last = 0, seq;
    int64_t stamp;
    if (read_state(dirfd, &seq, &stamp) == 0) last = seq;
    int ack = open_ack_ready();
    while (changes == 0 || count < changes) {
        if (!wait_for_event(inotify, STATE) || changes == 0) continue;
        if (read_state(dirfd, &seq, &stamp) == 0 && seq > last) {
            last = seq;
            count = deliver(samples, count, stamp, ack);
        }
    }
    write_samples(samples, count);
    write_cpu();
    return 0;
}

static int role_poller(void) {
    int dirfd = open_dir();
    int64_t *samples = calloc((size_t)(changes > 0 ? changes : 1), sizeof(int64_t));
    long count = 0;
    struct stat seen = {0}, info;
    fstatat(dirfd, STATE, &seen, 0);
    int ack = open_ack_ready();
    while (changes == 0 || count < changes) {
        sleep_ns(100 * 1000000LL);
        if (fstatat(dirfd, STATE, &info, 0) != 0) continue;
        if (info.st_ino == seen.st_ino && info.st_mtim.tv_nsec == seen.st_mtim.tv_nsec && info.st_mtim.tv_sec == seen.st_mtim.tv_sec) continue;
        seen = info;
        uint64_t seq;
        int64_t stamp;
        if (changes > 0 && read_state(dirfd, &seq, &stamp) == 0) count = deliver(samples, count, stamp, ack);
    }
    write_samples(samples, count);
    return 0;
}

static int role_throughput(void) {
    int dirfd = open_dir(), lockfd = open_lock(dirfd);
    int64_t wait = start_at - now_ns();
    if (wait > 0) sleep_ns(wait);
    int64_t end = start_at + seconds * 1000000000LL;
    long count = 0;
    int64_t now;
    int logfd = do_log ? open_log(dirfd) : -1;
    while ((now = now_ns()) < end) {
        if (do_log) commit_log(logfd, lockfd); else commit(dirfd, lockfd);
        count++;
    }
    printf("%ld %" PRId64 "\n", count, now - start_at);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: raw writer|reader|poller|idle|throughput [options]\n");
        return 2;
    }
    const char *role = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *arg = argv[i];
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(arg, "--fsync") == 0) { do_fsync = 1; continue; }
        if (strcmp(arg, "--poll") == 0) { do_poll = 1; continue; }
        if (strcmp(arg, "--log") == 0) { do_log = 1; continue; }
        if (!value) { fprintf(stderr, "raw: %s needs a value\n", arg); return 2; }
        i++;
        if (strcmp(arg, "--dir") == 0) dir = value;
        else if (strcmp(arg, "--ack") == 0) ack_path = value;
        else if (strcmp(arg, "--out") == 0) out_path = value;
        else if (strcmp(arg, "--readers") == 0) readers = atol(value);
        else if (strcmp(arg, "--changes") == 0) changes = atol(value);
        else if (strcmp(arg, "--seconds") == 0) seconds = atol(value);
        else if (strcmp(arg, "--gap-us") == 0) gap_us = atol(value);
        else if (strcmp(arg, "--start-at") == 0) start_at = atoll(value);
        else { fprintf(stderr, "raw: unknown option %s\n", arg); return 2; }
    }
    if (!dir) { fprintf(stderr, "raw: --dir is required\n"); return 2; }
    srandom((unsigned)getpid());
    if (strcmp(role, "writer") == 0) return role_writer();
    if (strcmp(role, "reader") == 0) return role_reader();
    if (strcmp(role, "poller") == 0) return role_poller();
    if (strcmp(role, "idle") == 0) { changes = 0; return do_poll ? role_poller() : role_reader(); }
    if (strcmp(role, "throughput") == 0) return role_throughput();
    fprintf(stderr, "raw: unknown role %s\n", role);
    return 2;
}
