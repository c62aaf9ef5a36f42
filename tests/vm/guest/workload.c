/*
 * The test guest's workload: a virtio-mmio (version 2) virtio-blk driver
 * with one split virtqueue, and the checks the host's exit status reports:
 * GET_ID, a pattern written and read back, FLUSH, DISCARD and WRITE_ZEROES
 * when offered, reads past the end that must fail, then timed 4 KiB random
 * reads at QD1 and QD32, with interrupts (IRQ 5, raised by the host's
 * KVM_IRQFD) and by polling the used ring. Prints "ok ..." / "FAIL ..." /
 * "perf ..." lines on the serial port and exits with the number of failures.
 */
#include "guest.h"

#define VIRTIO_BASE 0xd0000000u
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

#define F_BLK_RO 5
#define F_BLK_FLUSH 9
#define F_BLK_DISCARD 13
#define F_BLK_WRITE_ZEROES 14
#define F_VERSION_1 32

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define ST_OK 0
#define ST_IOERR 1

#define QSIZE 128
#define QD 32
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

struct virtq_desc {
  u64 addr;
  u32 len;
  u16 flags;
  u16 next;
};
struct virtq_avail {
  u16 flags;
  u16 idx;
  u16 ring[QSIZE];
  u16 used_event;
};
struct virtq_used_elem {
  u32 id;
  u32 len;
};
struct virtq_used {
  u16 flags;
  u16 idx;
  struct virtq_used_elem ring[QSIZE];
  u16 avail_event;
};
struct blk_hdr {
  u32 type;
  u32 reserved;
  u64 sector;
};
struct blk_range {
  u64 sector;
  u32 num_sectors;
  u32 flags;
};

static struct virtq_desc desc[QSIZE] __attribute__((aligned(4096)));
static struct virtq_avail avail __attribute__((aligned(4096)));
static struct virtq_used used __attribute__((aligned(4096)));
static struct blk_hdr hdrs[QD];
static volatile u8 statuses[QD];
static u8 bufs[QD][4096] __attribute__((aligned(4096)));

static u16 avail_shadow, used_last;
static u64 features;
static u32 capacity; /* sectors (images under 2 TiB) */
static u32 flags;
static int failures;
static volatile int device_broken;

static u32 rd(u32 off) { return mmio_read32(VIRTIO_BASE + off); }
static void wr(u32 off, u32 v) { mmio_write32(VIRTIO_BASE + off, v); }

static void check(int cond, const char *what) {
  if (cond) {
    printf_serial("ok %s\n", what);
  } else {
    printf_serial("FAIL %s\n", what);
    failures++;
  }
}

static int has(int bit) { return (int)((features >> bit) & 1); }

static void virtio_irq(void) {
  u32 isr = rd(R_INTERRUPT_STATUS);
  wr(R_INTERRUPT_ACK, isr);
  if ((isr & 2) && (rd(R_STATUS) & S_NEEDS_RESET)) device_broken = 1;
}

static int virtio_init(void) {
  if (rd(R_MAGIC) != 0x74726976 || rd(R_VERSION) != 2 || rd(R_DEVICE_ID) != 2) {
    printf_serial("FAIL no virtio-mmio block device (magic %x version %u id %u)\n", rd(R_MAGIC),
                  rd(R_VERSION), rd(R_DEVICE_ID));
    return -1;
  }
  wr(R_STATUS, 0);
  wr(R_STATUS, S_ACKNOWLEDGE);
  wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
  wr(R_DEVICE_FEATURES_SEL, 0);
  u64 offered = rd(R_DEVICE_FEATURES);
  wr(R_DEVICE_FEATURES_SEL, 1);
  offered |= (u64)rd(R_DEVICE_FEATURES) << 32;
  u64 want = (1ULL << F_VERSION_1) | (1ULL << F_BLK_RO) | (1ULL << F_BLK_FLUSH) |
             (1ULL << F_BLK_DISCARD) | (1ULL << F_BLK_WRITE_ZEROES);
  features = offered & want;
  wr(R_DRIVER_FEATURES_SEL, 0);
  wr(R_DRIVER_FEATURES, (u32)features);
  wr(R_DRIVER_FEATURES_SEL, 1);
  wr(R_DRIVER_FEATURES, (u32)(features >> 32));
  wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
  if (!(rd(R_STATUS) & S_FEATURES_OK)) {
    printf_serial("FAIL the device refused features %llx\n", features);
    return -1;
  }
  wr(R_QUEUE_SEL, 0);
  u32 max = rd(R_QUEUE_NUM_MAX);
  if (max < QSIZE) {
    printf_serial("FAIL queue 0 holds %u entries, want %u\n", max, QSIZE);
    return -1;
  }
  wr(R_QUEUE_NUM, QSIZE);
  wr(R_QUEUE_DESC_LOW, (u32)desc);
  wr(R_QUEUE_DESC_HIGH, 0);
  wr(R_QUEUE_DRIVER_LOW, (u32)&avail);
  wr(R_QUEUE_DRIVER_HIGH, 0);
  wr(R_QUEUE_DEVICE_LOW, (u32)&used);
  wr(R_QUEUE_DEVICE_HIGH, 0);
  wr(R_QUEUE_READY, 1);
  wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
  if (rd(R_STATUS) & S_NEEDS_RESET) {
    printf_serial("FAIL the device needs a reset right after DRIVER_OK\n");
    return -1;
  }
  capacity = rd(R_CONFIG);
  if (rd(R_CONFIG + 4) != 0) capacity = 0xfffffff0u;
  printf_serial("virtio-blk: features %llx, capacity %u sectors\n", features, capacity);
  return 0;
}

/* Puts slot s's request in the ring (not yet visible to a kick). */
static void submit(int s, u32 type, u64 sector, u32 len, int data_in) {
  struct virtq_desc *d = &desc[3 * s];
  hdrs[s].type = type;
  hdrs[s].reserved = 0;
  hdrs[s].sector = sector;
  statuses[s] = 0xff;
  d[0].addr = (u32)&hdrs[s];
  d[0].len = sizeof(struct blk_hdr);
  d[0].flags = DESC_F_NEXT;
  if (len > 0) {
    d[0].next = 3 * s + 1;
    d[1].addr = (u32)bufs[s];
    d[1].len = len;
    d[1].flags = DESC_F_NEXT | (data_in ? DESC_F_WRITE : 0);
    d[1].next = 3 * s + 2;
  } else {
    d[0].next = 3 * s + 2;
  }
  d[2].addr = (u32)&statuses[s];
  d[2].len = 1;
  d[2].flags = DESC_F_WRITE;
  d[2].next = 0;
  avail.ring[avail_shadow % QSIZE] = 3 * s;
  avail_shadow++;
}

static void kick(void) {
  barrier();
  *(volatile u16 *)&avail.idx = avail_shadow;
  mb(); /* the index store before the flags load (a store-load order) */
  if (!(*(volatile u16 *)&used.flags & USED_F_NO_NOTIFY)) wr(R_QUEUE_NOTIFY, 0);
}

static int interrupt_mode;

/* Waits for at least one completion; returns the slot of the next one. */
static int wait_one(void) {
  for (;;) {
    u16 idx = *(volatile u16 *)&used.idx;
    if (idx != used_last) {
      barrier();
      u32 id = used.ring[used_last % QSIZE].id;
      used_last++;
      return (int)(id / 3);
    }
    if (device_broken) return -1;
    if (interrupt_mode) {
      __asm__ volatile("cli");
      if (*(volatile u16 *)&used.idx == used_last && !device_broken) {
        __asm__ volatile("sti; hlt" ::: "memory");
      }
      __asm__ volatile("sti");
    } else {
      __asm__ volatile("pause");
    }
  }
}

/* One request at QD1; returns its status (0xfe: the device broke). */
static int request(u32 type, u64 sector, u32 len, int data_in) {
  submit(0, type, sector, len, data_in);
  kick();
  int s = wait_one();
  if (s < 0) return 0xfe;
  return statuses[s];
}

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
