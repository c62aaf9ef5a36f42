/*
 * A hostile driver: what a buggy or malicious guest does to the
 * virtio-mmio device, each followed by a check of what the device must do
 * (ignore the write, or set DEVICE_NEEDS_RESET and raise a configuration
 * interrupt), and at the end proof that the device still works after a
 * reset. The host must survive all of it; the exit status is the number of
 * checks that failed.
 */
#include "virtio_blk.h"

/* Waits up to `ms` for cond(); interrupts on. */
static int wait_until(int (*cond)(void), u32 ms) {
  u64 end = host_clock_ns() + (u64)ms * 1000000;
  while (!cond()) {
    if (host_clock_ns() > end) return 0;
    for (int i = 0; i < 1000; i++) __asm__ volatile("pause");
  }
  return 1;
}

static u32 config_irqs_seen;
static int config_irq_arrived(void) { return config_irqs > config_irqs_seen; }
static int needs_reset(void) { return (rd(R_STATUS) & S_NEEDS_RESET) != 0; }

static void negotiate(u32 hi, u32 lo) {
  wr(R_STATUS, 0);
  wr(R_STATUS, S_ACKNOWLEDGE);
  wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
  wr(R_DRIVER_FEATURES_SEL, 0);
  wr(R_DRIVER_FEATURES, lo);
  wr(R_DRIVER_FEATURES_SEL, 1);
  wr(R_DRIVER_FEATURES, hi);
  wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
}

static void queue(u32 num, u32 d, u32 a, u32 u) {
  wr(R_QUEUE_SEL, 0);
  wr(R_QUEUE_NUM, num);
  wr(R_QUEUE_DESC_LOW, d);
  wr(R_QUEUE_DESC_HIGH, 0);
  wr(R_QUEUE_DRIVER_LOW, a);
  wr(R_QUEUE_DRIVER_HIGH, 0);
  wr(R_QUEUE_DEVICE_LOW, u);
  wr(R_QUEUE_DEVICE_HIGH, 0);
  wr(R_QUEUE_READY, 1);
}

static void rings_clear(void) {
  memset(desc, 0, sizeof(struct virtq_desc) * QSIZE);
  memset(&avail, 0, sizeof(avail));
  memset(&used, 0, sizeof(used));
  avail_shadow = used_last = 0;
  device_broken = 0;
}

static int good_init(void) {
  rings_clear();
  return virtio_init();
}

int main(void) {
  puts_serial("guest: hostile virtio-mmio driver\n");
  irq_init();
  irq_hook = virtio_irq;
  __asm__ volatile("sti");
  interrupt_mode = 1;

  /* register accesses of the wrong width: reads give 0, nothing breaks */
  check(*(volatile u8 *)(VIRTIO_BASE + R_MAGIC) == 0, "a byte read of MagicValue reads 0");
  check(*(volatile u16 *)(VIRTIO_BASE + R_MAGIC + 2) == 0, "a 16-bit read of MagicValue reads 0");
  *(volatile u8 *)(VIRTIO_BASE + R_STATUS) = S_ACKNOWLEDGE;
  check(rd(R_STATUS) == 0, "a byte write of Status is ignored");

  /* config space: every byte, odd widths, past its end */
  u32 sum = 0;
  for (u32 off = 0; off < 0x100; off++) sum += *(volatile u8 *)(VIRTIO_BASE + R_CONFIG + off);
  check(*(volatile u32 *)(VIRTIO_BASE + 0x1fc) == 0, "config past its end reads 0");
  check(*(volatile u16 *)(VIRTIO_BASE + R_CONFIG + 1) ==
            (u16)((rd(R_CONFIG) >> 8) & 0xffff),
        "an unaligned 16-bit config read");
  printf_serial("  config byte sum %u\n", sum);

  /* queue registers before FEATURES_OK */
  wr(R_STATUS, 0);
  wr(R_QUEUE_SEL, 0);
  wr(R_QUEUE_NUM, 64);
  check(rd(R_QUEUE_NUM) == 0, "QueueNum before FEATURES_OK is ignored");

  /* features: legacy (no VERSION_1) and a feature not offered */
  negotiate(0, 0);
  check(!(rd(R_STATUS) & S_FEATURES_OK), "FEATURES_OK refused without VERSION_1");
  negotiate(1 | (1u << 30), 0);
  check(!(rd(R_STATUS) & S_FEATURES_OK), "FEATURES_OK refused with a feature not offered");

  /* DRIVER_OK without FEATURES_OK */
  wr(R_STATUS, 0);
  wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
  wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
  check(needs_reset(), "DRIVER_OK without FEATURES_OK: NEEDS_RESET");

  /* a queue of a size that is not a power of two, and one above QueueNumMax */
  negotiate(1, 0);
  queue(100, (u32)desc, (u32)&avail, (u32)&used);
  check(rd(R_QUEUE_READY) == 0, "a queue of 100 entries is not made ready");
  queue(1u << 20, (u32)desc, (u32)&avail, (u32)&used);
  check(rd(R_QUEUE_READY) == 0, "a queue above QueueNumMax is not made ready");

  /* rings outside RAM: NEEDS_RESET at DRIVER_OK, with a config interrupt */
  negotiate(1, 0);
  queue(QSIZE, 0xc0000000u, (u32)&avail, (u32)&used);
  config_irqs_seen = config_irqs;
  wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
  check(needs_reset(), "a descriptor table outside RAM: NEEDS_RESET");
  check(wait_until(config_irq_arrived, 2000), "the configuration interrupt arrived");

  /* notify for queues that do not exist, and before the device runs */
  wr(R_QUEUE_NOTIFY, 5);
  wr(R_QUEUE_NOTIFY, 0xffffffffu);
  wr(R_STATUS, 0);
  wr(R_QUEUE_NOTIFY, 0);
  check(rd(R_STATUS) == 0, "notifies on absent or stopped queues are ignored");

  /* a reset with requests in flight */
  if (good_init() < 0) return 100;
  for (int s = 0; s < QD; s++) submit(s, T_IN, (u64)s * 8, 4096, 1);
  kick();
  wr(R_STATUS, 0);
  check(rd(R_STATUS) == 0, "reset with 32 requests in flight");
  u16 done = *(volatile u16 *)&used.idx;
  int statuses_ok = 1;
  for (u16 i = 0; i < done; i++)
    if (statuses[used.ring[i].id / 3] != ST_OK) statuses_ok = 0;
  check(done <= QD && statuses_ok, "every request the device used before the reset has its status");
  printf_serial("  %u of 32 completed before the reset\n", done);

  /* a descriptor loop: the ring breaks, the device asks for a reset */
  if (good_init() < 0) return 100;
  submit(0, T_IN, 0, 4096, 1);
  desc[2].flags = DESC_F_WRITE | DESC_F_NEXT;
  desc[2].next = 0;
  config_irqs_seen = config_irqs;
  kick();
  check(wait_until(needs_reset, 2000), "a descriptor loop: NEEDS_RESET");
  check(wait_until(config_irq_arrived, 2000), "the configuration interrupt arrived");

  /* after all that, a reset gives a working device */
  if (good_init() < 0) return 100;
  check(request(T_IN, 0, 4096, 1) == ST_OK, "a read after the reset");
  check(request(T_IN, capacity, 512, 1) == ST_IOERR, "a read past the end after the reset");
  wr(R_STATUS, 0);
  printf_serial("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures;
}
