/* The test guests' virtio-mmio virtio-blk driver (virtio_blk.c). */
#ifndef VIRTIO_BLK_H
#define VIRTIO_BLK_H
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

extern struct virtq_desc desc[QSIZE];
extern struct virtq_avail avail;
extern struct virtq_used used;
extern struct blk_hdr hdrs[QD];
extern volatile u8 statuses[QD];
extern u8 bufs[QD][4096];
extern u16 avail_shadow, used_last;
extern u64 features;
extern u32 capacity;
extern int failures;
extern volatile int device_broken;
extern volatile u32 config_irqs;
extern int interrupt_mode;

u32 rd(u32 off);
void wr(u32 off, u32 v);
void check(int cond, const char *what);
int has(int bit);
void virtio_irq(void);
int virtio_init(void);
void submit(int s, u32 type, u64 sector, u32 len, int data_in);
void kick(void);
int wait_one(void);
int request(u32 type, u64 sector, u32 len, int data_in);
#endif
