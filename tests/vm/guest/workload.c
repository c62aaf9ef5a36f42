/*
 * The test guest's workload over the virtio-blk driver (virtio_blk.c):
 * GET_ID, a pattern written and read back, FLUSH, DISCARD and WRITE_ZEROES
 * when offered, reads past the end that must fail, then timed 4 KiB random
 * reads at QD1 and QD32, with interrupts (IRQ 5, raised by the host's
 * KVM_IRQFD) and by polling the used ring. Prints "ok ..." / "FAIL ..." /
 * "perf ..." lines on the serial port and exits with the number of failures.
 */
#include "virtio_blk.h"

static u32 flags;

static u8 pattern(u32 sector, u32 i) { return (u8)(sector * 7 + i * 13 + 0x5a); }

static void fill_pattern(u8 *b, u32 sector) {
  for (u32 i = 0; i < 4096; i++) b[i] = pattern(sector + i / 512, i % 512);
}

static int check_pattern(const u8 *b, u32 sector) {
  for (u32 i = 0; i < 4096; i++)
    if (b[i] != pattern(sector + i / 512, i % 512)) return 0;
  return 1;
}

static void functional(void) {
  int verify = !(flags & TEST_F_NO_VERIFY);
  int ro = has(F_BLK_RO);

  memset(bufs[0], 0, 20);
  int st = request(T_GET_ID, 0, 20, 1);
  bufs[0][20] = 0;
  check(st == ST_OK && bufs[0][0] != 0, "GET_ID");
  printf_serial("  serial \"%s\"\n", (const char *)bufs[0]);

  /* a pattern over the first 64 sectors and the last 8 */
  u32 starts[9];
  for (int i = 0; i < 8; i++) starts[i] = 8 * i;
  starts[8] = capacity - 8;
  int wrote = 1;
  for (int i = 0; i < 9; i++) {
    fill_pattern(bufs[0], starts[i]);
    st = request(T_OUT, starts[i], 4096, 0);
    if (ro ? st != ST_IOERR : st != ST_OK) wrote = 0;
  }
  check(wrote, ro ? "writes fail on a read-only disk" : "pattern written");
  int readback = 1;
  for (int i = 0; i < 9; i++) {
    memset(bufs[0], 0, 4096);
    st = request(T_IN, starts[i], 4096, 1);
    if (st != ST_OK || (verify && !ro && !check_pattern(bufs[0], starts[i]))) readback = 0;
  }
  check(readback, verify && !ro ? "pattern read back" : "reads");

  if (has(F_BLK_FLUSH)) check(request(T_FLUSH, 0, 0, 0) == ST_OK, "FLUSH");
  if (has(F_BLK_DISCARD) && !ro) {
    struct blk_range *r = (struct blk_range *)bufs[0];
    r->sector = 8;
    r->num_sectors = 8;
    r->flags = 0;
    check(request(T_DISCARD, 0, sizeof(*r), 0) == ST_OK, "DISCARD");
  }
  if (has(F_BLK_WRITE_ZEROES) && !ro) {
    struct blk_range *r = (struct blk_range *)bufs[0];
    r->sector = 16;
    r->num_sectors = 8;
    r->flags = 0;
    st = request(T_WRITE_ZEROES, 0, sizeof(*r), 0);
    memset(bufs[0], 0xee, 4096);
    int st2 = request(T_IN, 16, 4096, 1);
    int zero = 1;
    for (int i = 0; i < 4096; i++)
      if (bufs[0][i] != 0) zero = 0;
    check(st == ST_OK && st2 == ST_OK && (!verify || zero), "WRITE_ZEROES reads back as zeroes");
  }

  check(request(T_IN, capacity, 512, 1) == ST_IOERR, "a read at the capacity fails");
  check(request(T_IN, capacity - 1, 1024, 1) == ST_IOERR, "a read across the end fails");
  check(request(T_IN, 0xfffffffffffffff0ULL, 512, 1) == ST_IOERR, "a read at sector 2^64-16 fails");
  check(!device_broken, "the device did not ask for a reset");
}

static u32 rng = 0x12345678;
static u32 rand32(void) {
  rng ^= rng << 13;
  rng ^= rng >> 17;
  rng ^= rng << 5;
  return rng;
}

static u64 random_sector(void) { return (u64)(rand32() % (capacity / 8)) * 8; }

/* n random 4 KiB reads, qd of them in flight. */
static void timed(const char *mode, int qd, u32 n) {
  u32 irq0 = irq_count;
  u32 done = 0, issued = 0, errors = 0;
  u64 t0 = host_clock_ns(), c0 = rdtsc();
  for (int s = 0; s < qd && issued < n; s++, issued++) submit(s, T_IN, random_sector(), 4096, 1);
  kick();
  while (done < n) {
    int s = wait_one();
    if (s < 0) {
      printf_serial("FAIL perf %s qd%d: the device broke\n", mode, qd);
      failures++;
      return;
    }
    done++;
    if (statuses[s] != ST_OK) errors++;
    if (issued < n) {
      submit(s, T_IN, random_sector(), 4096, 1);
      issued++;
    }
    /* publish (and kick) once per batch of completions seen */
    if (*(volatile u16 *)&used.idx == used_last && avail.idx != avail_shadow) kick();
  }
  u64 c1 = rdtsc(), t1 = host_clock_ns();
  u64 ns = t1 - t0;
  u64 cycles = c1 - c0;
  u64 per_req_ns = ns / n;
  u64 iops = ns ? (u64)n * 1000000000ULL / ns : 0;
  printf_serial("perf %s qd%d: %u requests, %llu ns per request, %llu IOPS, %llu cycles per request, %u interrupts\n",
                mode, qd, n, per_req_ns, iops, cycles / n, irq_count - irq0);
  if (errors) {
    printf_serial("FAIL perf %s qd%d: %u requests failed\n", mode, qd, errors);
    failures++;
  }
}

int main(void) {
  puts_serial("guest: virtio-mmio virtio-blk workload\n");
  flags = inl(PORT_FLAGS);
  irq_init();
  irq_hook = virtio_irq;
  if (virtio_init() < 0) return 100;
  interrupt_mode = 1;
  __asm__ volatile("sti");
  avail.flags = 0;
  functional();
  u32 n1 = (flags & TEST_F_QUICK) ? 300 : 3000;
  u32 n32 = (flags & TEST_F_QUICK) ? 3000 : 30000;
  timed("interrupt", 1, n1);
  timed("interrupt", QD, n32);
  check(irq_count > 0, "interrupts arrived");
  interrupt_mode = 0;
  avail.flags = AVAIL_F_NO_INTERRUPT;
  u32 irqs = irq_count;
  timed("polling", 1, n1);
  timed("polling", QD, n32);
  printf_serial("  %u interrupts while polling\n", irq_count - irqs);
  /* reset the device with nothing in flight, as a driver unloading */
  wr(R_STATUS, 0);
  check(rd(R_STATUS) == 0, "reset");
  printf_serial("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures;
}
