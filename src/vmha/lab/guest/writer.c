/* The lab guest's workload: appends the lab VM's disk records to its raw disk, as the stand-in
 * `vmha-vm` process does to its file, so that the lab's verify reads both alike.
 *
 *   {"vm": "vm1", "host": "h2", "seq": 17, "t": 1796230287.1234, "mono": 35045.1234}\n
 *
 * one JSON line per write, plain text from the disk's first byte (no filesystem), each write
 * synchronous (O_SYNC: on the shared storage before the next one starts). `seq` continues from the
 * disk's last record. The guest knows neither which host it runs on (it may have been live-migrated)
 * nor the time to 0.1 s (TCG guests and an RTC of 1 s resolution): before each write it asks the
 * host's clock service over a virtio-serial port ("org.vmha.clock"), which answers with its host name,
 * Unix time and monotonic time (verify measures silences by the latter: the wall clock may step). A
 * question lost in a migration is sent again after ASK_AGAIN_MS (see ask()).
 *
 * It is the guest's init (pid 1): it mounts /dev, /proc and /sys itself, since every program started
 * under TCG costs boot time. The guest's kernel has its virtio drivers built in (no modules).
 *
 * Kernel command line: vmha.vm=NAME [vmha.interval=SECONDS]. Built static by scripts/build-guest.sh.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DISK "/dev/vda"
#define PORT_NAME "org.vmha.clock"
#define SECTOR 512
#define TAIL 4096

static void say(const char *fmt, const char *a) {
    fprintf(stderr, "vmha-guest: ");
    fprintf(stderr, fmt, a);
    fputc('\n', stderr);
}

/* The guest cannot work: said on the console; pid 1 must not exit (the kernel would panic). */
static void fatal(const char *why) {
    say("%s", why);
    if (getpid() != 1) exit(1);
    for (;;) pause();
}

/* vmha.KEY=value from /proc/cmdline, or NULL. */
static char *cmdline_arg(const char *key) {
    static char buf[4096];
    FILE *f = fopen("/proc/cmdline", "r");
    if (!f || !fgets(buf, sizeof buf, f)) return NULL;
    fclose(f);
    char want[64];
    snprintf(want, sizeof want, "vmha.%s=", key);
    for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n"))
        if (strncmp(tok, want, strlen(want)) == 0) return strdup(tok + strlen(want));
    return NULL;
}

static int zero(const char *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (b[i]) return 0;
    return 1;
}

/* Offset just past the last record: records fill the disk from byte 0, the rest is zeros. */
static off_t data_end(int fd, off_t size) {
    char b[SECTOR];
    off_t lo = 0, hi = size / SECTOR; /* the first all-zero sector is in [lo, hi] */
    while (lo < hi) {
        off_t mid = (lo + hi) / 2;
        if (pread(fd, b, SECTOR, mid * SECTOR) != SECTOR || zero(b, SECTOR)) hi = mid;
        else lo = mid + 1;
    }
    if (lo == 0) return 0;
    if (pread(fd, b, SECTOR, (lo - 1) * SECTOR) != SECTOR) return (lo - 1) * SECTOR;
    int n = SECTOR;
    while (n > 0 && b[n - 1] == 0) n--;
    return (lo - 1) * SECTOR + n;
}

/* The seq of the last complete record before `end` (0 on a new disk). */
static long long last_seq(int fd, off_t end) {
    static char b[TAIL + 1];
    off_t start = end > TAIL ? end - TAIL : 0;
    ssize_t n = pread(fd, b, (size_t)(end - start), start);
    if (n <= 0) return 0;
    b[n] = 0;
    for (char *p = b + n; p > b;) {
        char *line = p - 1;
        while (line > b && line[-1] != '\n') line--;
        char *s = strstr(line, "\"seq\": ");
        long long seq;
        if (s && s < p && sscanf(s, "\"seq\": %lld,", &seq) == 1 && memchr(line, '\n', (size_t)(p - line)))
            return seq;
        p = line;
    }
    return 0;
}

/* The virtio-serial port named PORT_NAME: /dev/vportNpM, found through sysfs. */
static int open_port(void) {
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    char path[300], name[64];
    while (d && (e = readdir(d))) {
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        int ok = fgets(name, sizeof name, f) && strncmp(name, PORT_NAME, strlen(PORT_NAME)) == 0;
        fclose(f);
        if (ok) {
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            closedir(d);
            return open(path, O_RDWR | O_NONBLOCK);
        }
    }
    if (d) closedir(d);
    return -1;
}

/* The clock service's answers as they arrive: a line may come in pieces. */
struct answers {
    char buf[256];
    size_t have;
};

#define ASK_AGAIN_MS 125
#define ASK_TIMEOUT_MS 500

/* Reads answers until ASK_AGAIN_MS pass without a byte: 0 on the answer to `nonce`. `mono` stays empty
 * when the service gives no monotonic time (an older one). */
static int await_answer(int port, struct answers *a, unsigned nonce, char *host, size_t hostlen, char *t,
                        size_t tlen, char *mono, size_t monolen) {
    struct pollfd p = {.fd = port, .events = POLLIN};
    while (poll(&p, 1, ASK_AGAIN_MS) > 0) {
        ssize_t n = read(port, a->buf + a->have, sizeof a->buf - 1 - a->have);
        if (n <= 0) return -1;
        a->have += (size_t)n;
        a->buf[a->have] = 0;
        char *nl;
        while ((nl = strchr(a->buf, '\n'))) {
            *nl = 0;
            unsigned got;
            char h[64], tt[32], mm[32] = "";
            int ok = sscanf(a->buf, "%u %63s %31s %31s", &got, h, tt, mm) >= 3 && got == nonce;
            memmove(a->buf, nl + 1, strlen(nl + 1) + 1);
            a->have = strlen(a->buf);
            if (ok) {
                snprintf(host, hostlen, "%s", h);
                snprintf(t, tlen, "%s", tt);
                snprintf(mono, monolen, "%s", mm);
                return 0;
            }
        }
        if (a->have >= sizeof a->buf - 1) a->have = 0;
    }
    return -1;
}

/* Asks the host's clock service: "? NONCE\n" -> "NONCE HOST TIME MONOTONIC\n". 0 on an answer.
 * A question sent just before a live migration's switch-over is answered to the old host, and lost:
 * the same question goes out again every ASK_AGAIN_MS (the new host answers it; a late answer from the
 * old one carries the same nonce and is as good), for at most ASK_TIMEOUT_MS. */
static int ask(int port, unsigned nonce, char *host, size_t hostlen, char *t, size_t tlen, char *mono,
               size_t monolen) {
    struct answers a = {.have = 0};
    char q[32];
    int len = snprintf(q, sizeof q, "? %u\n", nonce);
    for (int waited = 0; waited < ASK_TIMEOUT_MS; waited += ASK_AGAIN_MS) {
        if (write(port, q, (size_t)len) != len) return -1;
        if (await_answer(port, &a, nonce, host, hostlen, t, tlen, mono, monolen) == 0) return 0;
    }
    return -1; /* no answer: the service restarting */
}

/* pid 1's set-up: the filesystems the writer reads, and the disk's device node. */
static void boot(void) {
    mount("dev", "/dev", "devtmpfs", 0, NULL);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sys", "/sys", "sysfs", 0, NULL);
    struct timespec tick = {0, 20 * 1000 * 1000};
    struct stat st;
    for (int i = 0; i < 250 && stat(DISK, &st) != 0; i++) nanosleep(&tick, NULL);
}

int main(void) {
    if (getpid() == 1) boot();
    char *vm = cmdline_arg("vm"), *iv = cmdline_arg("interval");
    double interval = iv ? atof(iv) : 0.1;
    if (!vm) fatal("no vmha.vm= on the kernel command line");
    int disk = open(DISK, O_RDWR | O_SYNC);
    if (disk < 0) fatal("cannot open " DISK);
    off_t size = lseek(disk, 0, SEEK_END);
    off_t end = data_end(disk, size);
    long long seq = last_seq(disk, end);
    char c;
    if (end > 0 && pread(disk, &c, 1, end - 1) == 1 && c != '\n') { /* a torn last line */
        if (pwrite(disk, "\n", 1, end) == 1) end++;
    }
    fprintf(stderr, "vmha-guest: vm %s continuing its disk after seq %lld\n", vm, seq);
    int port = -1;
    unsigned nonce = 0;
    struct timespec pause = {(time_t)interval, (long)((interval - (time_t)interval) * 1e9)};
    for (;;) {
        char host[64], t[32], mono[32], rec[256];
        if (port < 0) port = open_port();
        if (port < 0 || ask(port, ++nonce, host, sizeof host, t, sizeof t, mono, sizeof mono) != 0) {
            nanosleep(&pause, NULL);
            continue;
        }
        char mono_field[48] = "";
        if (mono[0]) snprintf(mono_field, sizeof mono_field, ", \"mono\": %s", mono);
        int n = snprintf(rec, sizeof rec, "{\"vm\": \"%s\", \"host\": \"%s\", \"seq\": %lld, \"t\": %s%s}\n", vm,
                         host, seq + 1, t, mono_field);
        if (end + n > size) {
            say("%s", "disk full: no more records");
            pause.tv_sec = 60;
        } else if (pwrite(disk, rec, (size_t)n, end) == n) {
            end += n;
            seq++;
        }
        /* A failed write (storage lost) is retried at the next tick, as a real guest's I/O would be. */
        nanosleep(&pause, NULL);
    }
}
