/*
 * blkgen: the cost of moving one cache line between two CPUs (--probe-cpu). Two threads, one
 * pinned to each CPU, take turns writing a counter in one 64-byte line and spinning until the
 * other has answered; the time of a round trip over two is one transfer. On a virtual machine the
 * hypervisor may move the two virtual CPUs between physical cores that share a cache and cores
 * that do not, and this cost changes with it (here 25-35 ns or 155-180 ns); a server whose
 * requests cross the line between CPUs several times runs slower on the second kind.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "blkgen.h"

#define PROBE_ROUNDS 2000   /* round trips per trial */
#define PROBE_TRIALS 5      /* the median is reported */
#define PROBE_LIMIT_NS 50000000ULL /* a trial longer than this (a CPU taken by others) is dropped */

struct probe {
  _Alignas(64) volatile uint64_t line;
  _Alignas(64) int cpu;
  volatile int abort;
};

static bool pin_self(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
}

/* The far side: answers every odd value with the next even one (until told to stop). */
static void *probe_echo(void *arg) {
  struct probe *p = arg;
  if (!pin_self(p->cpu)) {
    p->abort = 1;
    return NULL;
  }
  for (uint64_t i = 1; i <= (uint64_t)PROBE_ROUNDS * PROBE_TRIALS; i++) {
    for (unsigned spins = 0; p->line != 2 * i - 1; spins++) {
      if ((spins & 4095) == 4095 && p->abort) return NULL;
    }
    p->line = 2 * i;
  }
  return NULL;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

double probe_transfer_ns(int near_cpu, int far_cpu) {
  struct probe *p = aligned_alloc(64, sizeof *p);
  if (!p) return -1;
  memset(p, 0, sizeof *p);
  p->cpu = far_cpu;
  pthread_t t;
  if (pthread_create(&t, NULL, probe_echo, p) != 0) {
    free(p);
    return -1;
  }
  cpu_set_t old;
  pthread_getaffinity_np(pthread_self(), sizeof old, &old);
  double trial_ns[PROBE_TRIALS];
  unsigned trials = 0;
  bool ok = pin_self(near_cpu);
  uint64_t i = 1;
  for (unsigned k = 0; ok && k < PROBE_TRIALS; k++) {
    uint64_t t0 = now_ns();
    for (unsigned r = 0; r < PROBE_ROUNDS; r++, i++) {
      p->line = 2 * i - 1;
      /* The clock is read once every 4096 spins, not to slow the spin it measures. */
      for (unsigned spins = 0; p->line != 2 * i; spins++) {
        if ((spins & 4095) == 4095 && (p->abort || now_ns() - t0 > PROBE_LIMIT_NS)) {
          ok = false;
          break;
        }
      }
      if (!ok) break;
    }
    if (!ok) break;
    uint64_t ns = now_ns() - t0;
    if (ns <= PROBE_LIMIT_NS) trial_ns[trials++] = (double)ns / PROBE_ROUNDS / 2;
  }
  p->abort = 1;
  pthread_join(t, NULL);
  pthread_setaffinity_np(pthread_self(), sizeof old, &old);
  free(p);
  if (trials == 0) return -1;
  qsort(trial_ns, trials, sizeof trial_ns[0], cmp_double);
  return trial_ns[trials / 2];
}
