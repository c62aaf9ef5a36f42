/*
 * C reference for bench/aio_bench.ts: a cross-thread round trip over two
 * eventfds, each side waiting in epoll_wait and clearing with read, as an
 * AioContext with polling disabled does.
 * Usage: eventfd_pingpong [iterations]; prints "ns_per_round_trip <n>".
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static int ping_fd, pong_fd;
static long iterations;

static int watch(int fd) {
  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
  if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
    perror("epoll");
    exit(1);
  }
  return ep;
}

/* Wait until fd is readable, then clear it. */
static void wait_clear(int ep, int fd) {
  struct epoll_event ev;
  uint64_t v;
  for (;;) {
    int n = epoll_wait(ep, &ev, 1, -1);
    if (n == 1 && read(fd, &v, sizeof v) == sizeof v) return;
  }
}

static void signal_fd(int fd) {
  uint64_t one = 1;
  if (write(fd, &one, sizeof one) != sizeof one) {
    perror("write");
    exit(1);
  }
}

static void *echo(void *arg) {
  (void)arg;
  int ep = watch(ping_fd);
  for (long i = 0; i < iterations; i++) {
    wait_clear(ep, ping_fd);
    signal_fd(pong_fd);
  }
  close(ep);
  return NULL;
}

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
  iterations = argc > 1 ? atol(argv[1]) : 20000;
  ping_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  pong_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  int ep = watch(pong_fd);
  pthread_t t;
  pthread_create(&t, NULL, echo, NULL);
  double t0 = now_ns();
  for (long i = 0; i < iterations; i++) {
    signal_fd(ping_fd);
    wait_clear(ep, pong_fd);
  }
  double dt = now_ns() - t0;
  pthread_join(t, NULL);
  printf("ns_per_round_trip %.0f\n", dt / iterations);
  return 0;
}
