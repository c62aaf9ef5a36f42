/*
 * blkgen: command line, guest memory, threads, run phases and the report.
 * Usage: blkgen --socket PATH [options]; blkgen --help lists them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "blkgen.h"

int g_phase = PHASE_WARMUP;
int g_signalled = 0;

uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void die(int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("blkgen: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(status);
}

static const char usage[] =
    "usage: blkgen --socket PATH [options]\n"
    "Drives a vhost-user-blk back-end as QEMU's vhost-user-blk device plus Linux's\n"
    "virtio_blk driver would, and reports IOPS, latency and notifications per I/O.\n"
    "  --socket PATH          the back-end's vhost-user socket (required)\n"
    "  --queues N             virtqueues                                  [1]\n"
    "  --threads N            threads driving them, queues spread round-robin;\n"
    "                         one loop and one poll() per thread           [one per queue]\n"
    "  --qd N                 requests in flight per queue                 [32]\n"
    "  --bs BYTES             request size, a multiple of 512             [4096]\n"
    "  --rw KIND              randread | randwrite | randrw               [randread]\n"
    "  --rwmixread PCT        reads in percent for randrw                 [70]\n"
    "  --mode MODE            interrupt (as virtio_blk) | poll            [interrupt]\n"
    "  --event-idx on|off     negotiate VIRTIO_RING_F_EVENT_IDX           [on]\n"
    "  --indirect on|off      one INDIRECT descriptor per request         [off]\n"
    "  --duration-ms MS       measured window                            [1000]\n"
    "  --warmup-ms MS         unmeasured run before it                    [200]\n"
    "  --size BYTES           bytes addressed from offset 0      [capacity; verify: <= 64 MiB]\n"
    "  --ring-size N          virtqueue size, a power of two  [256, or what QD chains need]\n"
    "  --cpu N                pin every thread to CPU N\n"
    "  --timeout-ms MS        no completion or reply for this long: exit 2 [5000]\n"
    "  --seed N               PRNG and verify pattern seed                [1]\n"
    "  --server-pid PID       also report that process's CPU time (its CPU clock, in ns) per I/O\n"
    "  --probe-cpu N          before connecting and after closing, time a cache line moving\n"
    "                         between CPU N (the server's) and --cpu: how far apart the two are\n"
    "  --verify               write a pattern over --size, read it back, compare\n"
    "  --allow-errors         exit 0 even if requests failed\n"
    "  --json                 one JSON line instead of text\n"
    "Exit: 0 ok, 1 errors (failed requests, verify mismatches, set-up), 2 stalled or no answer,\n"
    "128+signal if interrupted (the partial report is still printed).\n";

static unsigned long long parse_num(const char *flag, const char *s, unsigned long long min,
                                    unsigned long long max) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 0);
  if (errno || end == s || *end || v < min || v > max) {
    die(1, "--%s: '%s' is not a number in %llu..%llu", flag, s, min, max);
  }
  return v;
}

static bool parse_onoff(const char *flag, const char *s) {
  if (!strcmp(s, "on")) return true;
  if (!strcmp(s, "off")) return false;
  die(1, "--%s takes on or off, not '%s'", flag, s);
}

static void parse_options(int argc, char **argv, struct options *o) {
  *o = (struct options){
      .queues = 1, .qd = 32, .bs = 4096, .rw = RW_READ, .rwmixread = 70,
      .mode = MODE_INTERRUPT, .event_idx = true, .indirect = false, .duration_ms = 1000,
      .warmup_ms = 200, .cpu = -1, .timeout_ms = 5000, .seed = 1, .probe_cpu = -1,
  };
  enum {
    O_SOCKET = 256, O_QUEUES, O_QD, O_BS, O_RW, O_MIX, O_MODE, O_EVIDX, O_INDIRECT, O_DURATION,
    O_WARMUP, O_SIZE, O_RING, O_CPU, O_JSON, O_VERIFY, O_ALLOW, O_TIMEOUT, O_SEED, O_SERVER_PID, O_THREADS, O_PROBE_CPU, O_HELP,
  };
  static const struct option longopts[] = {
      {"socket", required_argument, 0, O_SOCKET},   {"queues", required_argument, 0, O_QUEUES},
      {"qd", required_argument, 0, O_QD},           {"bs", required_argument, 0, O_BS},
      {"rw", required_argument, 0, O_RW},           {"rwmixread", required_argument, 0, O_MIX},
      {"mode", required_argument, 0, O_MODE},       {"event-idx", required_argument, 0, O_EVIDX},
      {"indirect", required_argument, 0, O_INDIRECT},
      {"duration-ms", required_argument, 0, O_DURATION},
      {"warmup-ms", required_argument, 0, O_WARMUP}, {"size", required_argument, 0, O_SIZE},
      {"ring-size", required_argument, 0, O_RING},  {"cpu", required_argument, 0, O_CPU},
      {"json", no_argument, 0, O_JSON},             {"verify", no_argument, 0, O_VERIFY},
      {"allow-errors", no_argument, 0, O_ALLOW},    {"timeout-ms", required_argument, 0, O_TIMEOUT},
      {"seed", required_argument, 0, O_SEED},       {"help", no_argument, 0, O_HELP},
      {"server-pid", required_argument, 0, O_SERVER_PID},
      {"threads", required_argument, 0, O_THREADS},
      {"probe-cpu", required_argument, 0, O_PROBE_CPU},
      {0, 0, 0, 0},
  };
  int c;
  while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (c) {
    case O_SOCKET: o->socket = optarg; break;
    case O_QUEUES: o->queues = (unsigned)parse_num("queues", optarg, 1, 64); break;
    case O_THREADS: o->threads = (unsigned)parse_num("threads", optarg, 1, 64); break;
    case O_QD: o->qd = (unsigned)parse_num("qd", optarg, 1, 1024); break;
    case O_BS: o->bs = (unsigned)parse_num("bs", optarg, 512, 4u << 20); break;
    case O_RW:
      if (!strcmp(optarg, "randread")) o->rw = RW_READ;
      else if (!strcmp(optarg, "randwrite")) o->rw = RW_WRITE;
      else if (!strcmp(optarg, "randrw") || !strcmp(optarg, "mixed")) o->rw = RW_MIXED;
      else die(1, "--rw takes randread, randwrite or randrw, not '%s'", optarg);
      break;
    case O_MIX: o->rwmixread = (unsigned)parse_num("rwmixread", optarg, 0, 100); break;
    case O_MODE:
      if (!strcmp(optarg, "interrupt")) o->mode = MODE_INTERRUPT;
      else if (!strcmp(optarg, "poll")) o->mode = MODE_POLL;
      else die(1, "--mode takes interrupt or poll, not '%s'", optarg);
      break;
    case O_EVIDX: o->event_idx = parse_onoff("event-idx", optarg); break;
    case O_INDIRECT: o->indirect = parse_onoff("indirect", optarg); break;
    case O_DURATION: o->duration_ms = (unsigned)parse_num("duration-ms", optarg, 1, 86400000); break;
    case O_WARMUP: o->warmup_ms = (unsigned)parse_num("warmup-ms", optarg, 0, 86400000); break;
    case O_SIZE: o->size = parse_num("size", optarg, 512, ~0ULL); break;
    case O_RING: o->ring_size = (unsigned)parse_num("ring-size", optarg, 1, 32768); break;
    case O_CPU: o->cpu = (int)parse_num("cpu", optarg, 0, CPU_SETSIZE - 1); break;
    case O_JSON: o->json = true; break;
    case O_VERIFY: o->verify = true; break;
    case O_ALLOW: o->allow_errors = true; break;
    case O_TIMEOUT: o->timeout_ms = (unsigned)parse_num("timeout-ms", optarg, 1, 86400000); break;
    case O_SEED: o->seed = parse_num("seed", optarg, 0, 0xffff); break;
    case O_SERVER_PID: o->server_pid = (int)parse_num("server-pid", optarg, 1, 0x7fffffff); break;
    case O_PROBE_CPU: o->probe_cpu = (int)parse_num("probe-cpu", optarg, 0, CPU_SETSIZE - 1); break;
    case 'h':
    case O_HELP: fputs(usage, stdout); exit(0);
    default: fputs(usage, stderr); exit(1);
    }
  }
  if (optind < argc) die(1, "unexpected argument '%s'", argv[optind]);
  if (!o->socket) {
    fputs(usage, stderr);
    exit(1);
  }
  if (!o->threads) o->threads = o->queues;
  if (o->threads > o->queues) die(1, "--threads %u is more than --queues %u", o->threads, o->queues);
  if (o->bs % VIRTIO_BLK_SECTOR) die(1, "--bs %u is not a multiple of 512", o->bs);
  if (o->ring_size && (o->ring_size & (o->ring_size - 1))) {
    die(1, "--ring-size %u is not a power of two", o->ring_size);
  }
  if (o->probe_cpu >= 0 && o->cpu < 0) die(1, "--probe-cpu needs --cpu (the other end)");
  if (o->probe_cpu >= 0 && o->probe_cpu == o->cpu) die(1, "--probe-cpu %d is --cpu itself", o->cpu);
}

static void on_signal(int sig) {
  __atomic_store_n(&g_signalled, sig, __ATOMIC_RELAXED);
  __atomic_store_n(&g_phase, PHASE_STOP, __ATOMIC_RELAXED);
}

/* Sleeps until deadline (ns, CLOCK_MONOTONIC) or until a thread failed or a signal came. */
static void sleep_until(uint64_t deadline, struct queue *qs, unsigned n) {
  for (;;) {
    if (__atomic_load_n(&g_phase, __ATOMIC_RELAXED) == PHASE_STOP) return;
    for (unsigned i = 0; i < n; i++) {
      if (__atomic_load_n(&qs[i].failed, __ATOMIC_RELAXED)) return;
    }
    uint64_t now = now_ns();
    if (now >= deadline) return;
    uint64_t step = deadline - now;
    if (step > 20000000ULL) step = 20000000ULL;
    struct timespec ts = {(time_t)(step / 1000000000ULL), (long)(step % 1000000000ULL)};
    nanosleep(&ts, NULL);
  }
}

/*
 * CPU time of every thread of process pid in us; -1 if gone. The process CPU clock
 * (clock_getcpuclockid) counts in ns; /proc/PID/stat's utime + stime (fields 14 and 15 of
 * proc(5)) count in clock ticks (10 ms), too coarse for a short window of a mostly idle server,
 * and are only the fallback.
 */
static double process_cpu_us(int pid) {
  clockid_t clock;
  struct timespec ts;
  if (clock_getcpuclockid(pid, &clock) == 0 && clock_gettime(clock, &ts) == 0) {
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
  }
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  /* The command name (field 2) may contain spaces and parentheses: count from the last ')'. */
  char *p = strrchr(buf, ')');
  if (!p) return -1;
  unsigned long long utime = 0, stime = 0;
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2) {
    return -1;
  }
  return (double)(utime + stime) * 1e6 / (double)sysconf(_SC_CLK_TCK);
}

static double tv_us(struct timeval tv) { return (double)tv.tv_sec * 1e6 + (double)tv.tv_usec; }

static const char *rw_name(enum rw_kind rw) {
  return rw == RW_READ ? "randread" : rw == RW_WRITE ? "randwrite" : "randrw";
}

int main(int argc, char **argv) {
  struct options o;
  parse_options(argc, argv, &o);

  struct sigaction sa = {.sa_handler = on_signal};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  if (o.cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(o.cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) < 0) die(1, "--cpu %d: %s", o.cpu, strerror(errno));
  }

  /* Before connecting: the server waits on its socket, so its CPU is free for the probe. */
  double transfer0 = o.probe_cpu >= 0 ? probe_transfer_ns(o.cpu, o.probe_cpu) : -1;
  struct device dev;
  device_connect(&dev, &o);
  uint64_t capacity = dev.capacity * VIRTIO_BLK_SECTOR;
  uint64_t size = o.size ? o.size : capacity;
  if (o.verify && !o.size && size > (64ULL << 20)) size = 64ULL << 20;
  if (size > capacity) {
    die(1, "--size %llu is beyond the capacity (%llu bytes)", (unsigned long long)size,
        (unsigned long long)capacity);
  }
  uint64_t nblocks = size / o.bs;
  if (nblocks == 0) die(1, "the device (%llu bytes) is smaller than one block", (unsigned long long)size);
  if (o.verify && o.bs % 8) die(1, "--verify needs --bs a multiple of 8");
  if (o.bs % dev.blk_size) {
    fprintf(stderr, "blkgen: warning: --bs %u is not a multiple of the device's block size %u\n",
            o.bs, dev.blk_size);
  }
  bool indirect = (dev.features >> VIRTIO_RING_F_INDIRECT_DESC) & 1;
  bool event_idx = (dev.features >> VIRTIO_RING_F_EVENT_IDX) & 1;

  /* Each request takes one descriptor with INDIRECT, three without. */
  unsigned per = indirect ? 1 : 3;
  unsigned need = per * o.qd;
  unsigned num = o.ring_size;
  if (!num) {
    num = 256;
    while (num < need) num *= 2;
  }
  if (need > num) die(1, "--qd %u needs %u descriptors: --ring-size %u is too small", o.qd, need, num);
  if (num > 32768) die(1, "--qd %u needs a ring of more than 32768 entries", o.qd);

  size_t per_queue = queue_mem_size(&o, num, o.qd);
  dev.mem_size = per_queue * o.queues;
  dev.memfd = memfd_create("blkgen-guest-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (dev.memfd < 0) die(1, "memfd_create: %s", strerror(errno));
  if (ftruncate(dev.memfd, (off_t)dev.mem_size) < 0) die(1, "ftruncate: %s", strerror(errno));
  dev.mem = mmap(NULL, dev.mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, dev.memfd, 0);
  if (dev.mem == MAP_FAILED) die(1, "mmap guest memory: %s", strerror(errno));
  device_set_mem_table(&dev);

  struct queue *qs = calloc(o.queues, sizeof *qs);
  if (!qs) die(1, "out of memory");
  for (unsigned i = 0; i < o.queues; i++) {
    queue_init(&qs[i], i, &o, &dev, per_queue * i, num, o.qd, nblocks);
    device_setup_vring(&dev, &qs[i]);
  }
  for (unsigned i = 0; i < o.queues; i++) device_enable_vring(&dev, i, true);

  /* Queue i is driven by thread i % threads (round-robin). */
  struct worker *ws = calloc(o.threads, sizeof *ws);
  if (!ws) die(1, "out of memory");
  for (unsigned t = 0; t < o.threads; t++) {
    ws[t].index = t;
    ws[t].o = &o;
    ws[t].q = calloc(o.queues, sizeof *ws[t].q);
    ws[t].pfd = calloc(o.queues, sizeof *ws[t].pfd);
    if (!ws[t].q || !ws[t].pfd) die(1, "out of memory");
  }
  for (unsigned i = 0; i < o.queues; i++) {
    struct worker *w = &ws[i % o.threads];
    qs[i].thread = w->index;
    w->q[w->nq++] = &qs[i];
  }

  /* The worker threads never take SIGINT/SIGTERM: main sees them and sets PHASE_STOP. */
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  pthread_t *threads = calloc(o.threads, sizeof *threads);
  if (!threads) die(1, "out of memory");
  if (o.verify) __atomic_store_n(&g_phase, PHASE_MEASURE, __ATOMIC_RELAXED);
  struct rusage ru0, ru1;
  uint64_t t0 = now_ns();
  getrusage(RUSAGE_SELF, &ru0);
  for (unsigned i = 0; i < o.threads; i++) {
    int e = pthread_create(&threads[i], NULL, worker_thread, &ws[i]);
    if (e) die(1, "pthread_create: %s", strerror(e));
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);

  uint64_t t1;
  double server0 = -1, server1 = -1;
  if (o.verify) {
    for (unsigned i = 0; i < o.threads; i++) pthread_join(threads[i], NULL);
    t1 = now_ns();
    getrusage(RUSAGE_SELF, &ru1);
  } else {
    sleep_until(t0 + (uint64_t)o.warmup_ms * 1000000ULL, qs, o.queues);
    t0 = now_ns();
    getrusage(RUSAGE_SELF, &ru0);
    if (o.server_pid) server0 = process_cpu_us(o.server_pid);
    if (!__atomic_load_n(&g_signalled, __ATOMIC_RELAXED)) {
      __atomic_store_n(&g_phase, PHASE_MEASURE, __ATOMIC_RELAXED);
      sleep_until(t0 + (uint64_t)o.duration_ms * 1000000ULL, qs, o.queues);
    }
    __atomic_store_n(&g_phase, PHASE_STOP, __ATOMIC_RELAXED);
    t1 = now_ns();
    getrusage(RUSAGE_SELF, &ru1);
    if (o.server_pid) server1 = process_cpu_us(o.server_pid);
    for (unsigned i = 0; i < o.threads; i++) pthread_join(threads[i], NULL);
  }

  bool failed = false;
  for (unsigned i = 0; i < o.queues; i++) {
    if (qs[i].failed) {
      failed = true;
      fprintf(stderr, "blkgen: queue %u: %s\n", i, qs[i].failure);
    }
  }
  /* Stop the rings cleanly (GET_VRING_BASE) unless requests are stuck in them. */
  if (!failed) {
    for (unsigned i = 0; i < o.queues; i++) {
      if (!device_stop_vring(&dev, i, 2000)) {
        fprintf(stderr, "blkgen: warning: no answer to GET_VRING_BASE of queue %u\n", i);
        break;
      }
    }
  }
  device_close(&dev);
  double transfer1 = o.probe_cpu >= 0 ? probe_transfer_ns(o.cpu, o.probe_cpu) : -1;

  struct queue_stats tot = {0};
  for (unsigned i = 0; i < o.queues; i++) {
    struct queue_stats *s = &qs[i].st;
    tot.ops += s->ops;
    tot.reads += s->reads;
    tot.writes += s->writes;
    tot.errors += s->errors;
    tot.kicks += s->kicks;
    tot.calls += s->calls;
    tot.busy_ns += s->busy_ns;
    tot.reaps += s->reaps;
    tot.mismatches += s->mismatches;
    tot.verified += s->verified;
    tot.total_ops += s->total_ops;
    hist_merge(&tot.lat, &s->lat);
  }
  /* Sleeps and poll() calls are the threads': one poll() waits for all of a thread's queues. */
  uint64_t waits = 0, polls = 0, preempted = 0;
  for (unsigned t = 0; t < o.threads; t++) {
    waits += ws[t].waits;
    polls += ws[t].polls;
    preempted += ws[t].preempted;
  }
  double secs = (double)(t1 - t0) / 1e9;
  double user_us = tv_us(ru1.ru_utime) - tv_us(ru0.ru_utime);
  double sys_us = tv_us(ru1.ru_stime) - tv_us(ru0.ru_stime);
  double ops = tot.ops ? (double)tot.ops : 1;
  uint64_t stale = polls > waits ? polls - waits : 0;
  /*
   * What the load costs blkgen: the wall time of the passes that had completions, from reaping
   * to the kick decision. Waiting is not load: spinning on an empty ring (poll mode), or
   * re-enabling interrupts and poll()/read() on the call eventfd (interrupt mode), which often
   * return at once while the server is busy. (Wall time: an overestimate if blkgen was preempted.)
   */
  double busy_us = (double)tot.busy_ns / 1e3;
  double iops = (double)tot.ops / secs;
  double mbps = iops * o.bs / 1e6;
  double mean = tot.lat.count ? (double)tot.lat.sum_ns / (double)tot.lat.count / 1e3 : 0;
  double p50 = hist_quantile(&tot.lat, 0.50) / 1e3, p90 = hist_quantile(&tot.lat, 0.90) / 1e3;
  double p99 = hist_quantile(&tot.lat, 0.99) / 1e3, p999 = hist_quantile(&tot.lat, 0.999) / 1e3;
  double max = (double)tot.lat.max_ns / 1e3;
  int sig = __atomic_load_n(&g_signalled, __ATOMIC_RELAXED);

  if (o.json) {
    printf("{\"iops\":%.0f,\"mbps\":%.1f,\"ops\":%llu,\"reads\":%llu,\"writes\":%llu,"
           "\"errors\":%llu,\"seconds\":%.6f,"
           "\"lat_us\":{\"mean\":%.2f,\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"p999\":%.2f,"
           "\"max\":%.2f},"
           "\"kicks_per_io\":%.4f,\"waits_per_io\":%.4f,\"calls_per_io\":%.4f,"
           "\"stale_wakeups\":%llu,\"preempted\":%llu,\"ops_per_reap\":%.2f,\"cpu_us_per_io\":%.4f,\"busy_us_per_io\":%.4f,"
           "\"cpu_ms\":{\"user\":%.1f,\"system\":%.1f},\"cpu_cores\":%.3f,\"busy_cores\":%.3f,",
           iops, mbps, (unsigned long long)tot.ops, (unsigned long long)tot.reads,
           (unsigned long long)tot.writes, (unsigned long long)tot.errors, secs, mean, p50, p90,
           p99, p999, max, tot.kicks / ops, waits / ops, tot.calls / ops,
           (unsigned long long)stale, (unsigned long long)preempted,
           tot.reaps ? (double)tot.ops / (double)tot.reaps : 0, (user_us + sys_us) / ops,
           busy_us / ops,
           user_us / 1e3, sys_us / 1e3, (user_us + sys_us) / 1e6 / secs, busy_us / 1e6 / secs);
    if (o.server_pid && server0 >= 0 && server1 >= 0) {
      printf("\"server_cpu_us_per_io\":%.4f,\"server_cores\":%.3f,", (server1 - server0) / ops,
             (server1 - server0) / 1e6 / secs);
    }
    if (o.probe_cpu >= 0) {
      printf("\"transfer_ns\":{\"before\":%.1f,\"after\":%.1f},", transfer0, transfer1);
    }
    if (o.verify) {
      printf("\"verified\":%llu,\"mismatches\":%llu,", (unsigned long long)tot.verified,
             (unsigned long long)tot.mismatches);
    }
    /* Per queue (index order) and per thread: which queues were served, and who slept. */
    printf("\"per_queue\":[");
    for (unsigned i = 0; i < o.queues; i++) {
      const struct queue_stats *s = &qs[i].st;
      printf("%s{\"thread\":%u,\"ops\":%llu,\"reads\":%llu,\"writes\":%llu,\"errors\":%llu,"
             "\"kicks\":%llu,\"calls\":%llu,\"reaps\":%llu,\"total_ops\":%llu,\"verified\":%llu,"
             "\"p99_us\":%.2f}",
             i ? "," : "", qs[i].thread, (unsigned long long)s->ops,
             (unsigned long long)s->reads, (unsigned long long)s->writes,
             (unsigned long long)s->errors, (unsigned long long)s->kicks,
             (unsigned long long)s->calls, (unsigned long long)s->reaps,
             (unsigned long long)s->total_ops,
             (unsigned long long)s->verified, hist_quantile(&s->lat, 0.99) / 1e3);
    }
    printf("],\"per_thread\":[");
    for (unsigned t = 0; t < o.threads; t++) {
      printf("%s{\"queues\":%u,\"waits\":%llu,\"polls\":%llu,\"preempted\":%llu}", t ? "," : "",
             ws[t].nq, (unsigned long long)ws[t].waits, (unsigned long long)ws[t].polls,
             (unsigned long long)ws[t].preempted);
    }
    printf("],");
    printf("\"config\":{\"rw\":\"%s\",\"bs\":%u,\"qd\":%u,\"queues\":%u,\"threads\":%u,"
           "\"mode\":\"%s\","
           "\"event_idx\":%s,\"indirect\":%s,\"ring_size\":%u,\"size\":%llu,\"verify\":%s},"
           "\"stalled\":%s,\"interrupted\":%s}\n",
           rw_name(o.rw), o.bs, o.qd, o.queues, o.threads,
           o.mode == MODE_POLL ? "poll" : "interrupt", event_idx ? "true" : "false", indirect ? "true" : "false", num,
           (unsigned long long)size, o.verify ? "true" : "false", failed ? "true" : "false",
           sig ? "true" : "false");
  } else {
    printf("blkgen: %s bs=%u qd=%u queues=%u threads=%u mode=%s event_idx=%s indirect=%s ring=%u%s\n",
           rw_name(o.rw), o.bs, o.qd, o.queues, o.threads,
           o.mode == MODE_POLL ? "poll" : "interrupt", event_idx ? "on" : "off",
           indirect ? "on" : "off", num, o.verify ? " verify" : "");
    printf("  iops %.0f  (%.1f MB/s)  ops %llu in %.3f s  errors %llu\n", iops, mbps,
           (unsigned long long)tot.ops, secs, (unsigned long long)tot.errors);
    printf("  lat us: mean %.2f  p50 %.2f  p90 %.2f  p99 %.2f  p99.9 %.2f  max %.2f\n", mean, p50,
           p90, p99, p999, max);
    printf("  kicks/io %.4f  waits/io %.4f  calls/io %.4f  stale wakeups %llu  preempted %llu\n",
           tot.kicks / ops, waits / ops, tot.calls / ops, (unsigned long long)stale,
           (unsigned long long)preempted);
    printf("  cpu us/io %.4f  (user %.1f ms, system %.1f ms, %.2f cores)  busy us/io %.4f (%.2f cores)"
           "  ops/reap %.2f\n",
           (user_us + sys_us) / ops, user_us / 1e3, sys_us / 1e3, (user_us + sys_us) / 1e6 / secs,
           busy_us / ops, busy_us / 1e6 / secs, tot.reaps ? (double)tot.ops / (double)tot.reaps : 0);
    if (o.server_pid && server0 >= 0 && server1 >= 0) {
      printf("  server (pid %d) cpu us/io %.4f  (%.2f cores)\n", o.server_pid,
             (server1 - server0) / ops, (server1 - server0) / 1e6 / secs);
    }
    if (o.probe_cpu >= 0) {
      printf("  cache line CPU %d <-> %d: %.1f ns before, %.1f ns after\n", o.cpu, o.probe_cpu,
             transfer0, transfer1);
    }
    if (o.verify) {
      printf("  verify: %llu blocks read back, %llu mismatches\n",
             (unsigned long long)tot.verified, (unsigned long long)tot.mismatches);
    }
  }
  fflush(stdout);
  if (failed) return 2;
  if (sig) return 128 + sig;
  if (tot.mismatches || (tot.errors && !o.allow_errors)) return 1;
  if (o.verify && tot.verified == 0) return 1;
  return 0;
}
