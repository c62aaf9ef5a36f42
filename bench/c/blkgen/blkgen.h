/*
 * blkgen: a vhost-user-blk front-end and load generator (libc + pthreads).
 *
 * It plays QEMU's vhost-user-blk device (the control channel) and Linux's
 * virtio_blk driver (split virtqueues in shared memory) at once, so a
 * vhost-user-blk back-end can be measured without a VM and without the load
 * generator being the bottleneck. See docs/blkgen.md.
 *
 * Files: main.c (command line, report), vhost_user.c (control channel and
 * device set-up), queue.c (virtqueues and the threads that drive them, one or
 * more queues each), hist.c (latency histogram).
 */
#ifndef BLKGEN_H
#define BLKGEN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- virtio 1.2 facts (section numbers of the spec) ---- */

/* 6: reserved feature bits. */
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
/* 5.2.3: virtio-blk feature bits. */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_MQ 12

/* 2.7.5: descriptor flags. */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
/* 2.7.6 / 2.7.8: notification suppression without EVENT_IDX. */
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

/* 5.2.6: request types, status values; offsets are in 512-byte sectors. */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_SECTOR 512

/* 5.2.4: offsets in struct virtio_blk_config. */
#define VIRTIO_BLK_CONFIG_SIZE 60
#define VIRTIO_BLK_CONFIG_CAPACITY 0
#define VIRTIO_BLK_CONFIG_SEG_MAX 12
#define VIRTIO_BLK_CONFIG_BLK_SIZE 20
#define VIRTIO_BLK_CONFIG_NUM_QUEUES 34

/* 2.7.5: one descriptor of a split virtqueue. */
struct vring_desc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};

/* 2.7.8: one used ring element. */
struct vring_used_elem {
  uint32_t id;
  uint32_t len;
};

/* 2.7.10: whether moving an index from old to new_idx passes event. */
static inline bool vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old) {
  return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* ---- configuration (command line) ---- */

enum rw_kind { RW_READ, RW_WRITE, RW_MIXED };
enum wait_mode { MODE_INTERRUPT, MODE_POLL };

struct options {
  const char *socket;
  unsigned queues;
  unsigned threads; /* queues are spread round-robin over them; 0 on the command line = queues */
  unsigned qd;
  unsigned bs;
  enum rw_kind rw;
  unsigned rwmixread; /* percent of reads for RW_MIXED */
  enum wait_mode mode;
  bool event_idx;
  bool indirect;
  unsigned duration_ms;
  unsigned warmup_ms;
  uint64_t size;       /* bytes addressed; 0 = capacity */
  unsigned ring_size;  /* 0 = smallest power of two that fits qd chains, at least 256 */
  int cpu;             /* -1 = no pinning */
  bool json;
  bool verify;
  bool allow_errors;
  unsigned timeout_ms; /* no completion for this long with requests out: stalled */
  uint64_t seed;
  int server_pid; /* 0 = none; else its CPU time over the measured window is reported */
  int probe_cpu;  /* -1 = none; else the cache-line transfer to --cpu is measured before and after */
};

/* ---- latency histogram (hist.c): log-linear buckets of nanoseconds ---- */

#define HIST_SUB_BITS 5
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS ((64 - HIST_SUB_BITS + 1) * HIST_SUB)

struct hist {
  uint64_t count;
  uint64_t sum_ns;
  uint64_t max_ns;
  uint64_t bucket[HIST_BUCKETS];
};

/* Bucket of v ns: exact below 2*HIST_SUB, then HIST_SUB buckets per power of two (~3%). */
static inline unsigned hist_index(uint64_t v) {
  if (v < 2 * HIST_SUB) return (unsigned)v;
  unsigned e = 63u - (unsigned)__builtin_clzll(v);
  unsigned shift = e - HIST_SUB_BITS;
  return (shift + 1) * HIST_SUB + (unsigned)((v >> shift) & (HIST_SUB - 1));
}

static inline void hist_add(struct hist *h, uint64_t ns) {
  h->count++;
  h->sum_ns += ns;
  if (ns > h->max_ns) h->max_ns = ns;
  h->bucket[hist_index(ns)]++;
}

void hist_merge(struct hist *into, const struct hist *from);
/* The value (ns, bucket middle) below which a fraction q of the samples lie. */
double hist_quantile(const struct hist *h, double q);

/* ---- the device as set up over vhost-user (vhost_user.c) ---- */

struct queue;

struct device {
  int sock;
  uint64_t features;          /* acknowledged (SET_FEATURES) */
  uint64_t offered;           /* GET_FEATURES */
  uint64_t protocol_features; /* acknowledged */
  bool reply_ack;
  unsigned timeout_ms; /* for every reply */
  unsigned max_queues; /* GET_QUEUE_NUM, 1 without MQ */
  uint64_t capacity;   /* sectors */
  uint32_t blk_size;
  uint32_t seg_max;
  int memfd;
  uint8_t *mem; /* guest memory; guest physical address = offset into it */
  size_t mem_size;
};

/* Connects and negotiates (features, protocol features, queues, config). Exits on failure. */
void device_connect(struct device *d, const struct options *o);
/* Sends SET_MEM_TABLE for d->mem (one region, the whole memfd). */
void device_set_mem_table(struct device *d);
/* SET_VRING_NUM/BASE/ADDR/KICK/CALL for q; ENABLE is separate (after all queues). */
void device_setup_vring(struct device *d, struct queue *q);
void device_enable_vring(struct device *d, unsigned index, bool on);
/* GET_VRING_BASE (stops the ring); returns false if the back-end did not answer. */
bool device_stop_vring(struct device *d, unsigned index, unsigned timeout_ms);
void device_close(struct device *d);

/* ---- virtqueues and the threads that drive them (queue.c) ---- */

/* Per-request state of one slot (its descriptors, buffers and submit time). */
struct slot {
  uint64_t t_submit;
  uint64_t block;
  bool is_read;
};

struct queue_stats {
  uint64_t ops; /* completions inside the measured window */
  uint64_t reads;
  uint64_t writes;
  uint64_t errors;       /* status byte != 0 (measured window and verify) */
  uint64_t kicks;        /* kick eventfd writes, measured window */
  uint64_t calls;        /* device notifications: the sum of the call eventfd's counts read */
  uint64_t busy_ns;      /* wall time of the passes that found completions, measured window */
  uint64_t reaps;        /* those passes (ops / reaps: completions per pass), measured window */
  uint64_t mismatches;   /* verify: blocks read back different from what was written */
  uint64_t verified;     /* verify: blocks read back and compared */
  uint64_t total_ops;    /* every completion, warm-up and drain included */
  struct hist lat;
};

struct queue {
  unsigned index;
  const struct options *o;
  struct device *dev;
  uint16_t num; /* ring size */
  unsigned slots;
  bool event_idx;
  bool indirect;
  /* Rings (in guest memory) and their guest physical addresses. */
  struct vring_desc *desc;
  uint16_t *avail; /* flags, idx, ring[num], used_event */
  uint16_t *used;  /* flags, idx, then elems; avail_event after them */
  struct vring_used_elem *used_ring;
  uint16_t *used_event;
  uint16_t *avail_event;
  uint64_t desc_gpa, avail_gpa, used_gpa;
  /* Per slot: header (16), indirect table (48), status (1) in 128 bytes; data buffers. */
  uint8_t *meta;
  uint64_t meta_gpa;
  uint8_t *data;
  uint64_t data_gpa;
  struct slot *slot;
  uint16_t *added; /* slots queued in this pass (their submit time is set at publish) */
  uint16_t *free_list; /* slots not in flight */
  int kick_fd, call_fd;
  /* Driver state. */
  uint16_t avail_idx;  /* next free avail entry (shadow, published with a release store) */
  uint16_t kicked_idx; /* avail idx at the previous kick decision */
  uint16_t last_used;
  unsigned inflight;
  unsigned free_slots;
  bool submitting;        /* the pass has more jobs for this queue */
  bool done;              /* nothing more to submit and nothing in flight */
  uint64_t last_progress; /* ns of the last completion (stall detection) */
  uint64_t rng;
  uint64_t nblocks;
  /* Verify: the blocks this queue owns are index, index+queues, ... */
  uint64_t next_block;
  struct queue_stats st;
  unsigned thread; /* the worker that drives it */
  /* Set when the queue failed (stalled, bad used entry); its thread stops. */
  int failed;
  char failure[160];
};

/*
 * One thread and the queues it drives (index, index + threads, ...), as one CPU of a guest
 * handles the interrupts of the queues mapped to it: one loop reaps, refills and kicks each
 * queue and sleeps in one poll() over all their call eventfds.
 */
struct worker {
  unsigned index;
  const struct options *o;
  struct queue **q;
  unsigned nq;
  struct pollfd *pfd; /* one per queue; fd -1 for a queue that is done */
  uint64_t waits;     /* sleeps (voluntary context switches), measured window */
  uint64_t polls;     /* poll() calls; those that did not sleep found a signal left over from
                         entries already reaped */
  uint64_t preempted; /* involuntary context switches (the CPU taken away), measured window */
  /* The measured window as this thread saw it (for its context switch counts). */
  bool in_window;
  long sleeps0, preempted0;
  bool failed; /* one of its queues failed */
};

/* Bytes of guest memory one queue needs (rings, per-slot metadata, data). */
size_t queue_mem_size(const struct options *o, unsigned num, unsigned slots);
/* Lays out q in mem at offset off (rings, descriptor chains), creates its eventfds. */
void queue_init(struct queue *q, unsigned index, const struct options *o, struct device *d,
                size_t off, unsigned num, unsigned slots, uint64_t nblocks);
/* The thread body (arg: a struct worker): warm-up, measured window, drain; or the verify passes. */
void *worker_thread(void *arg);

/* ---- run phases, shared by main and the queue threads ---- */

enum phase { PHASE_WARMUP, PHASE_MEASURE, PHASE_STOP };
extern int g_phase;       /* __atomic accessed */
extern int g_signalled;   /* SIGINT/SIGTERM seen */
uint64_t now_ns(void);

/* ---- probe.c ---- */

/*
 * One-way time in ns to move a cache line from CPU near_cpu to far_cpu and back, halved (median of
 * a few trials); -1 if a thread cannot be pinned or every trial was held up (a busy CPU).
 */
double probe_transfer_ns(int near_cpu, int far_cpu);

/* A spin-wait hint to the CPU (x86 PAUSE), so a polling loop yields to the sibling thread. */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}
_Noreturn void die(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
