/*
 * The test guests' virtio-mmio (version 2) virtio-blk driver: one split
 * virtqueue of QSIZE entries at queue 0, QD request slots of three
 * descriptors each (header, data, status), completions by interrupt (IRQ 5)
 * or by polling the used ring. Shared by workload.c and hostile.c.
 */
#include "virtio_blk.h"

struct virtq_desc desc[QSIZE] __attribute__((aligned(4096)));
struct virtq_avail avail __attribute__((aligned(4096)));
struct virtq_used used __attribute__((aligned(4096)));
struct blk_hdr hdrs[QD];
volatile u8 statuses[QD];
u8 bufs[QD][4096] __attribute__((aligned(4096)));

u16 avail_shadow, used_last;
u64 features;
u32 capacity; /* sectors (images under 2 TiB) */
int failures;
volatile int device_broken;
volatile u32 config_irqs;

u32 rd(u32 off) { return mmio_read32(VIRTIO_BASE + off); }
void wr(u32 off, u32 v) { mmio_write32(VIRTIO_BASE + off, v); }

void check(int cond, const char *what) {
  if (cond) {
    printf_serial("ok %s\n", what);
  } else {
    printf_serial("FAIL %s\n", what);
    failures++;
  }
}

int has(int bit) { return (int)((features >> bit) & 1); }

void virtio_irq(void) {
  u32 isr = rd(R_INTERRUPT_STATUS);
  wr(R_INTERRUPT_ACK, isr);
  if (isr & 2) {
    config_irqs++;
    if (rd(R_STATUS) & S_NEEDS_RESET) device_broken = 1;
  }
}

int virtio_init(void) {
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
void submit(int s, u32 type, u64 sector, u32 len, int data_in) {
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

int interrupt_mode;

void kick(void) {
  barrier();
  *(volatile u16 *)&avail.idx = avail_shadow;
  mb(); /* the index store before the flags load (a store-load order) */
  if (!(*(volatile u16 *)&used.flags & USED_F_NO_NOTIFY)) wr(R_QUEUE_NOTIFY, 0);
}

/* Waits for at least one completion; returns the slot of the next one. */
int wait_one(void) {
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
int request(u32 type, u64 sector, u32 len, int data_in) {
  submit(0, type, sector, len, data_in);
  kick();
  int s = wait_one();
  if (s < 0) return 0xfe;
  return statuses[s];
}

