/*
 * The bare PostgreSQL baseline for the TabSyncPostgres benchmarks (Benchmarks/README.md): what
 * a shared change log on PostgreSQL costs at the least. A writer commits one transaction per
 * change (INSERT of a row with the time it was written, pg_notify, COMMIT: one round trip); a
 * reader LISTENs, and for each notification reads the row and takes the latency. The same ack
 * FIFO protocol as raw.c and tabsync-bench: a reader writes one byte per delivered change, the
 * writer waits for all readers before the next change.
 *
 *   pgbare setup      --conninfo C
 *   pgbare writer     --conninfo C --ack FIFO --readers N --changes K
 *   pgbare reader     --conninfo C --ack FIFO --changes K --out FILE
 *   pgbare throughput --conninfo C --seconds S --start-at NS --key K
 *
 * The password comes from PGPASSWORD, as for any libpq program.
 */
#include <errno.h>
#include <fcntl.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void die(const char *what, PGconn *conn) {
    fprintf(stderr, "pgbare: %s%s%s\n", what, conn ? ": " : "", conn ? PQerrorMessage(conn) : "");
    exit(1);
}

static PGconn *connect_db(const char *conninfo) {
    PGconn *conn = PQconnectdb(conninfo);
    if (PQstatus(conn) != CONNECTION_OK) die("connect", conn);
    return conn;
}

static void exec_ok(PGconn *conn, const char *sql) {
    PGresult *result = PQexec(conn, sql);
    ExecStatusType status = PQresultStatus(result);
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) die(sql, conn);
    PQclear(result);
}

static void ack_send(int fd) {
    char byte = 1;
    while (write(fd, &byte, 1) != 1) if (errno != EINTR) die("ack write", NULL);
}

static void ack_receive(int fd, int count) {
    char buffer[256];
    while (count > 0) {
        ssize_t got = read(fd, buffer, count < (int)sizeof buffer ? (size_t)count : sizeof buffer);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) die("the ack pipe ended", NULL);
        count -= (int)got;
    }
}

/* One change: INSERT + pg_notify in one transaction, one round trip. */
static void commit_change(PGconn *conn, const char *key, int64_t sequence) {
    char sql[512];
    snprintf(sql, sizeof sql,
             "BEGIN; INSERT INTO pgbare_changes (key, seq, stamp) VALUES ('%s', %lld, %lld); "
             "SELECT pg_notify('pgbare', '%s %lld'); COMMIT",
             key, (long long)sequence, (long long)now_ns(), key, (long long)sequence);
    exec_ok(conn, sql);
}

int main(int argc, char **argv) {
    if (argc < 2) die("usage: pgbare setup|writer|reader|throughput [options]", NULL);
    const char *role = argv[1], *conninfo = "", *ack = NULL, *out = NULL, *key = "k";
    int readers = 1, changes = 0, seconds = 0;
    int64_t start_at = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--conninfo")) conninfo = argv[i + 1];
        else if (!strcmp(argv[i], "--ack")) ack = argv[i + 1];
        else if (!strcmp(argv[i], "--out")) out = argv[i + 1];
        else if (!strcmp(argv[i], "--readers")) readers = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--changes")) changes = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--start-at")) start_at = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--key")) key = argv[i + 1];
        else die("unknown option", NULL);
    }
    PGconn *conn = connect_db(conninfo);
    if (!strcmp(role, "setup")) {
        exec_ok(conn, "DROP TABLE IF EXISTS pgbare_changes");
        exec_ok(conn, "CREATE TABLE pgbare_changes (key text NOT NULL, seq bigint NOT NULL, stamp bigint NOT NULL, PRIMARY KEY (key, seq))");
    } else if (!strcmp(role, "writer")) {
        int fd = open(ack, O_RDWR | O_CLOEXEC);
        if (fd < 0) die("open ack", NULL);
        ack_receive(fd, readers);
        for (int i = 1; i <= changes; i++) {
            commit_change(conn, key, i);
            ack_receive(fd, readers);
        }
    } else if (!strcmp(role, "reader")) {
        exec_ok(conn, "LISTEN pgbare");
        int fd = open(ack, O_WRONLY | O_CLOEXEC);
        if (fd < 0) die("open ack", NULL);
        int64_t *samples = calloc((size_t)changes, sizeof *samples);
        int count = 0;
        ack_send(fd);
        while (count < changes) {
            struct pollfd p = {.fd = PQsocket(conn), .events = POLLIN};
            if (poll(&p, 1, -1) < 0 && errno != EINTR) die("poll", NULL);
            if (!PQconsumeInput(conn)) die("consume", conn);
            PGnotify *note;
            while ((note = PQnotifies(conn)) != NULL && count < changes) {
                char sql[256];
                char note_key[128];
                long long sequence = 0;
                if (sscanf(note->extra, "%127s %lld", note_key, &sequence) != 2) die("payload", NULL);
                PQfreemem(note);
                /* The listener reads the row, as a reader of a change log does. */
                snprintf(sql, sizeof sql, "SELECT stamp FROM pgbare_changes WHERE key = '%s' AND seq = %lld", note_key, sequence);
                PGresult *result = PQexec(conn, sql);
                if (PQresultStatus(result) != PGRES_TUPLES_OK || PQntuples(result) != 1) die("read the row", conn);
                int64_t stamp = atoll(PQgetvalue(result, 0, 0));
                PQclear(result);
                samples[count++] = now_ns() - stamp;
                ack_send(fd);
            }
        }
        FILE *file = fopen(out, "w");
        if (!file) die("open out", NULL);
        for (int i = 0; i < count; i++) fprintf(file, "%lld\n", (long long)samples[i]);
        fclose(file);
    } else if (!strcmp(role, "throughput")) {
        int64_t wait = start_at - now_ns();
        if (wait > 0) usleep((useconds_t)(wait / 1000));
        int64_t end = start_at + (int64_t)seconds * 1000000000, time = now_ns();
        long long count = 0;
        while (time < end) {
            commit_change(conn, key, ++count);
            time = now_ns();
        }
        printf("%lld %lld\n", count, (long long)(time - start_at));
    } else {
        die("unknown role", NULL);
    }
    PQfinish(conn);
    return 0;
}
