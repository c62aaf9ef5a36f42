/*
 * blkgen: split virtqueues (virtio 1.2, 2.7) driven the way Linux's
 * virtio_ring.c + virtio_blk.c drive them, by threads of one or more queues
 * each (as one guest CPU handles the queues whose interrupts it takes).
 *
 * Every slot has a fixed chain: header (device reads), data (device writes
 * for a read, reads for a write), status (device writes); either as three
 * descriptors 3s, 3s+1, 3s+2 or, with INDIRECT, as descriptor s pointing at a
 * three-entry table of the slot's own. Submitting a request writes its
 * header, status byte and avail entry; nothing is allocated per request.
 *
 * Interrupt mode (as virtio_blk with blk-mq): keep QD requests in flight;
 * after a batch is added, publish avail idx (release) and kick only if the
 * device asked for it (virtqueue_kick_prepare); reap every used entry; when
 * none are left on any of the thread's queues, re-enable interrupts on each
 * (virtqueue_enable_cb_prepare), full fence, look again (virtqueue_poll) and
 * only then sleep in one poll() on their call eventfds; interrupts stay
 * disabled while there is work. Poll mode: interrupts off, spin on used idx.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include "blkgen.h"

#define SLOT_META 128 /* header @0 (16), indirect table @16 (48), status @64 */
#define META_TABLE 16
#define META_STATUS 64
#define PAGE 4096

static size_t align_up(size_t x, size_t a) { return (x + a - 1) & ~(a - 1); }

/* Ring layout at offset 0 of the queue's area: desc | avail (+used_event) | used (+avail_event). */
static size_t rings_size(unsigned num) {
  size_t s = align_up(16u * num, PAGE);
  s = align_up(s + 6 + 2u * num, PAGE);
  return align_up(s + 6 + 8u * num, PAGE);
}

size_t queue_mem_size(const struct options *o, unsigned num, unsigned slots) {
  return rings_size(num) + align_up((size_t)SLOT_META * slots, PAGE) +
         align_up((size_t)o->bs, PAGE) * slots;
}

static uint64_t xorshift64s(uint64_t *s) {
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1DULL;
}

/* The verify pattern: word i of block b (docs/blkgen.md; tests check it in the image). */
static inline uint64_t pattern_word(uint64_t seed, uint64_t block, uint64_t i) {
  return (block << 32) ^ (seed << 16) ^ i;
}

void queue_init(struct queue *q, unsigned index, const struct options *o, struct device *d,
                size_t off, unsigned num, unsigned slots, uint64_t nblocks) {
  memset(q, 0, sizeof *q);
  q->index = index;
  q->o = o;
  q->dev = d;
  q->num = (uint16_t)num;
  q->slots = slots;
  q->event_idx = (d->features >> VIRTIO_RING_F_EVENT_IDX) & 1;
  q->indirect = (d->features >> VIRTIO_RING_F_INDIRECT_DESC) & 1;
  q->nblocks = nblocks;
  q->next_block = index;
  q->rng = (o->seed + 1) * 0x9E3779B97F4A7C15ULL ^ ((uint64_t)index << 40);
  if (q->rng == 0) q->rng = 1;

  uint8_t *base = d->mem + off;
  q->desc_gpa = off;
  q->desc = (struct vring_desc *)base;
  size_t a = align_up(16u * num, PAGE);
  q->avail_gpa = off + a;
  q->avail = (uint16_t *)(base + a);
  q->used_event = &q->avail[2 + num];
  size_t u = align_up(a + 6 + 2u * num, PAGE);
  q->used_gpa = off + u;
  q->used = (uint16_t *)(base + u);
  q->used_ring = (struct vring_used_elem *)(q->used + 2);
  q->avail_event = (uint16_t *)(q->used_ring + num);
  size_t m = rings_size(num);
  q->meta = base + m;
  q->meta_gpa = off + m;
  size_t dd = m + align_up((size_t)SLOT_META * slots, PAGE);
  q->data = base + dd;
  q->data_gpa = off + dd;
  size_t stride = align_up(o->bs, PAGE);

  q->slot = calloc(slots, sizeof *q->slot);
  q->added = calloc(slots, sizeof *q->added);
  q->free_list = calloc(slots, sizeof *q->free_list);
  if (!q->slot || !q->added || !q->free_list) die(1, "out of memory");

  /* Fixed chains: only the data descriptor's WRITE flag changes per request. */
  for (unsigned s = 0; s < slots; s++) {
    uint64_t hdr = q->meta_gpa + (uint64_t)SLOT_META * s;
    uint64_t data = q->data_gpa + (uint64_t)stride * s;
    struct vring_desc chain[3] = {
        {hdr, 16, VRING_DESC_F_NEXT, 1},
        {data, o->bs, VRING_DESC_F_NEXT, 2},
        {hdr + META_STATUS, 1, VRING_DESC_F_WRITE, 0},
    };
    if (q->indirect) {
      struct vring_desc *t = (struct vring_desc *)(q->meta + (size_t)SLOT_META * s + META_TABLE);
      memcpy(t, chain, sizeof chain);
      q->desc[s] = (struct vring_desc){hdr + META_TABLE, sizeof chain, VRING_DESC_F_INDIRECT, 0};
    } else {
      for (unsigned i = 0; i < 3; i++) {
        q->desc[3 * s + i] = chain[i];
        if (i < 2) q->desc[3 * s + i].next = (uint16_t)(3 * s + i + 1);
      }
    }
  }
  q->kick_fd = eventfd(0, EFD_CLOEXEC);
  q->call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (q->kick_fd < 0 || q->call_fd < 0) die(1, "eventfd: %s", strerror(errno));
}

/* The data descriptor of slot s (in the ring or in its indirect table). */
static inline struct vring_desc *data_desc(struct queue *q, unsigned s) {
  if (q->indirect) {
    return (struct vring_desc *)(q->meta + (size_t)SLOT_META * s + META_TABLE) + 1;
  }
  return &q->desc[3 * s + 1];
}

static inline uint8_t *slot_data(struct queue *q, unsigned s) {
  return q->data + align_up(q->o->bs, PAGE) * s;
}

static inline uint8_t *slot_status(struct queue *q, unsigned s) {
  return q->meta + (size_t)SLOT_META * s + META_STATUS;
}

/* Builds the request of slot s and adds it to the avail ring (not yet published). Hot path. */
static inline void add_request(struct queue *q, unsigned s, bool is_read, uint64_t block) {
  uint8_t *h = q->meta + (size_t)SLOT_META * s;
  uint32_t type = is_read ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
  uint64_t sector = block * (q->o->bs / VIRTIO_BLK_SECTOR);
  memcpy(h, &type, 4);
  memset(h + 4, 0, 4);
  memcpy(h + 8, &sector, 8);
  h[META_STATUS] = 0xff; /* a completion that forgot the status shows up as an error */
  struct vring_desc *dd = data_desc(q, s);
  uint16_t flags = VRING_DESC_F_NEXT | (is_read ? VRING_DESC_F_WRITE : 0);
  if (dd->flags != flags) dd->flags = flags;
  q->slot[s].block = block;
  q->slot[s].is_read = is_read;
  uint16_t head = (uint16_t)(q->indirect ? s : 3 * s);
  q->avail[2 + (q->avail_idx & (q->num - 1))] = head;
  q->avail_idx++;
  q->inflight++;
}

/* Publishes the added entries (release) and kicks if the device wants it (virtqueue_kick_prepare). */
static inline void publish_and_kick(struct queue *q, bool measuring) {
  __atomic_store_n(&q->avail[1], q->avail_idx, __ATOMIC_RELEASE);
  /* The avail idx store must be visible before we read the device's suppression state. */
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  uint16_t old = q->kicked_idx, new_idx = q->avail_idx;
  q->kicked_idx = new_idx;
  bool need;
  if (q->event_idx) {
    need = vring_need_event(__atomic_load_n(q->avail_event, __ATOMIC_RELAXED), new_idx, old);
  } else {
    need = !(__atomic_load_n(&q->used[0], __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY);
  }
  if (!need) return;
  uint64_t one = 1;
  if (write(q->kick_fd, &one, sizeof one) != sizeof one) die(1, "kick: %s", strerror(errno));
  if (measuring) q->st.kicks++;
}

/* Interrupts off (virtqueue_disable_cb): no flag with EVENT_IDX, used_event one behind us. */
static inline void disable_cb(struct queue *q) {
  if (q->event_idx) {
    __atomic_store_n(q->used_event, (uint16_t)(q->last_used - 1), __ATOMIC_RELAXED);
  } else {
    __atomic_store_n(&q->avail[0], VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);
  }
}

/* Interrupts on for the next used entry (virtqueue_enable_cb_prepare); the caller fences and re-checks. */
static inline void enable_cb(struct queue *q) {
  if (q->event_idx) {
    __atomic_store_n(q->used_event, q->last_used, __ATOMIC_RELAXED);
  } else {
    __atomic_store_n(&q->avail[0], 0, __ATOMIC_RELAXED);
  }
}

static void fail(struct queue *q, const char *fmt, unsigned long long a, unsigned long long b) {
  snprintf(q->failure, sizeof q->failure, fmt, a, b);
  q->failed = 1;
  __atomic_store_n(&g_phase, PHASE_STOP, __ATOMIC_RELAXED);
}

/* What the next request of a pass is: false when the workload has no more. */
struct job {
  bool is_read;
  uint64_t block;
};

enum pass { PASS_TIMED, PASS_VERIFY_WRITE, PASS_VERIFY_READ };

static inline bool next_job(struct queue *q, enum pass pass, struct job *j) {
  if (pass == PASS_TIMED) {
    if (__atomic_load_n(&g_phase, __ATOMIC_RELAXED) == PHASE_STOP) return false;
    uint64_t r = xorshift64s(&q->rng);
    j->block = (uint64_t)(((unsigned __int128)r * q->nblocks) >> 64);
    switch (q->o->rw) {
    case RW_READ: j->is_read = true; break;
    case RW_WRITE: j->is_read = false; break;
    default: j->is_read = (xorshift64s(&q->rng) % 100) < q->o->rwmixread; break;
    }
    return true;
  }
  if (__atomic_load_n(&g_signalled, __ATOMIC_RELAXED) || q->failed) return false;
  if (q->next_block >= q->nblocks) return false;
  /* Blocks index, index+queues, ... in a scattered order: block = k * P mod n (P prime > n). */
  uint64_t k = q->next_block;
  q->next_block += q->o->queues;
  j->block = (k * 2147483647ULL) % q->nblocks;
  j->is_read = pass == PASS_VERIFY_READ;
  return true;
}

static void prepare_data(struct queue *q, unsigned s, enum pass pass, const struct job *j) {
  if (pass == PASS_TIMED) return;
  uint64_t *w = (uint64_t *)slot_data(q, s);
  size_t n = q->o->bs / 8;
  if (pass == PASS_VERIFY_WRITE) {
    for (size_t i = 0; i < n; i++) w[i] = pattern_word(q->o->seed, j->block, i);
  } else {
    memset(w, 0x5a, q->o->bs); /* so data the device did not write cannot pass */
  }
}

static void check_data(struct queue *q, unsigned s) {
  const uint64_t *w = (const uint64_t *)slot_data(q, s);
  uint64_t b = q->slot[s].block;
  size_t n = q->o->bs / 8;
  q->st.verified++;
  for (size_t i = 0; i < n; i++) {
    if (w[i] != pattern_word(q->o->seed, b, i)) {
      if (q->st.mismatches++ < 3) {
        fprintf(stderr, "blkgen: verify: queue %u block %llu word %zu: got 0x%016llx\n", q->index,
                (unsigned long long)b, i, (unsigned long long)w[i]);
      }
      return;
    }
  }
}

/*
 * Opens or closes the thread's measured window as the phase moves. Its voluntary context
 * switches in it are sleeps (in poll(), on the call eventfds): waits; its involuntary ones are
 * the times the scheduler took the CPU from it with work to do: preempted.
 */
static inline void track_window(struct worker *w, bool measuring) {
  if (measuring == w->in_window) return;
  w->in_window = measuring;
  struct rusage ru;
  getrusage(RUSAGE_THREAD, &ru);
  if (measuring) {
    w->sleeps0 = ru.ru_nvcsw;
    w->preempted0 = ru.ru_nivcsw;
  } else {
    w->waits += (uint64_t)(ru.ru_nvcsw - w->sleeps0);
    w->preempted += (uint64_t)(ru.ru_nivcsw - w->preempted0);
  }
}

/* Every slot free, jobs to submit, progress as of now. */
static void start_pass(struct worker *w, unsigned i) {
  struct queue *q = w->q[i];
  q->free_slots = 0;
  for (unsigned s = q->slots; s-- > 0;) q->free_list[q->free_slots++] = (uint16_t)s;
  q->submitting = true;
  q->done = false;
  q->last_progress = now_ns();
  w->pfd[i] = (struct pollfd){.fd = q->call_fd, .events = POLLIN};
}

/*
 * Reaps every used entry of q: 1 if there were some (*start: the time they were seen), 0 if
 * none, -1 if the device broke the ring (q failed). Hot path.
 */
static inline int reap(struct queue *q, enum pass pass, bool measuring, uint64_t *start) {
  uint16_t used_idx = __atomic_load_n(&q->used[1], __ATOMIC_ACQUIRE);
  if (used_idx == q->last_used) return 0;
  if ((uint16_t)(used_idx - q->last_used) > q->inflight) {
    fail(q, "used idx moved by %llu with %llu requests in flight",
         (uint16_t)(used_idx - q->last_used), q->inflight);
    return -1;
  }
  uint64_t now = now_ns();
  *start = now;
  while (q->last_used != used_idx) {
    struct vring_used_elem e = q->used_ring[q->last_used & (q->num - 1)];
    q->last_used++;
    unsigned s = q->indirect ? e.id : e.id / 3;
    if (s >= q->slots || (!q->indirect && e.id % 3 != 0)) {
      fail(q, "used entry with id %llu (%llu slots)", e.id, q->slots);
      return -1;
    }
    q->inflight--;
    q->st.total_ops++;
    uint8_t status = *slot_status(q, s);
    if (status != VIRTIO_BLK_S_OK) {
      if (q->st.errors++ < 3) {
        fprintf(stderr, "blkgen: queue %u: %s of block %llu: status %u\n", q->index,
                q->slot[s].is_read ? "read" : "write", (unsigned long long)q->slot[s].block,
                status);
      }
    } else if (pass == PASS_VERIFY_READ) {
      check_data(q, s);
    }
    if (measuring) {
      q->st.ops++;
      if (q->slot[s].is_read) q->st.reads++;
      else q->st.writes++;
      hist_add(&q->st.lat, now - q->slot[s].t_submit);
    }
    q->free_list[q->free_slots++] = (uint16_t)s;
  }
  q->last_progress = now;
  return 1;
}

/* Refills the free slots: the requests the application submits now, one kick for all. Hot path. */
static inline void refill(struct queue *q, enum pass pass, bool measuring) {
  struct job j;
  unsigned n_added = 0;
  while (q->submitting && q->free_slots > 0) {
    if (!next_job(q, pass, &j)) {
      q->submitting = false;
      break;
    }
    unsigned s = q->free_list[--q->free_slots];
    prepare_data(q, s, pass, &j);
    add_request(q, s, j.is_read, j.block);
    q->added[n_added++] = (uint16_t)s;
  }
  if (n_added) {
    uint64_t ts = now_ns();
    for (unsigned i = 0; i < n_added; i++) q->slot[q->added[i]].t_submit = ts;
    publish_and_kick(q, measuring);
  }
}

/* No completion for this long with requests out is a stall (a second once a signal came). */
static inline uint64_t stall_limit_ns(const struct options *o) {
  uint64_t limit = (uint64_t)o->timeout_ms * 1000000ULL;
  if (__atomic_load_n(&g_signalled, __ATOMIC_RELAXED) && limit > 1000000000ULL) limit = 1000000000ULL;
  return limit;
}

/* Fails the first of w's queues with requests out and no completion since now - limit. */
static bool check_stall(struct worker *w, uint64_t now) {
  uint64_t limit = stall_limit_ns(w->o);
  for (unsigned i = 0; i < w->nq; i++) {
    struct queue *q = w->q[i];
    if (q->done || q->inflight == 0 || now - q->last_progress <= limit) continue;
    fail(q, "stalled: %llu requests outstanding (no completion for %llu ms)", q->inflight,
         (now - q->last_progress) / 1000000ULL);
    return true;
  }
  return false;
}

/*
 * Runs one pass over w's queues until their jobs are done (timed: until PHASE_STOP) and nothing
 * is in flight. Each loop: per queue, reap its used entries, refill and publish/kick it; if no
 * queue had completions, wait for all of them at once (spin, or one poll() on their call
 * eventfds). With one queue this is the loop of a thread per queue.
 */
static void run_pass(struct worker *w, enum pass pass) {
  bool poll_mode = w->o->mode == MODE_POLL;
  for (unsigned i = 0; i < w->nq; i++) start_pass(w, i);
  unsigned spins = 0;
  for (;;) {
    bool measuring = __atomic_load_n(&g_phase, __ATOMIC_RELAXED) == PHASE_MEASURE;
    track_window(w, measuring);
    bool reaped = false, all_done = true;
    uint64_t seen = 0; /* when the last queue with completions was reaped */
    for (unsigned i = 0; i < w->nq; i++) {
      struct queue *q = w->q[i];
      if (q->done) continue;
      uint64_t pass_start = 0;
      int r = reap(q, pass, measuring, &pass_start);
      if (r < 0) goto out;
      refill(q, pass, measuring);
      /* Load is the passes that reaped something; waiting (spinning, poll(), read()) is not. */
      if (r) {
        reaped = true;
        seen = pass_start;
        if (measuring) {
          q->st.busy_ns += now_ns() - pass_start;
          q->st.reaps++;
        }
      }
      if (!q->submitting && q->inflight == 0) {
        q->done = true;
        w->pfd[i].fd = -1; /* poll() skips it */
      } else {
        all_done = false;
      }
    }
    if (all_done) break;
    if (reaped) {
      spins = 0;
      /* A queue the device never completes must not hide behind busy siblings. */
      if (w->nq > 1 && check_stall(w, seen)) goto out;
      continue;
    }

    if (poll_mode) {
      cpu_relax();
      if (++spins < 1024) continue;
      spins = 0;
    } else {
      /* virtqueue_enable_cb_prepare + virtqueue_poll on each queue: re-enable, fence, look again. */
      for (unsigned i = 0; i < w->nq; i++) {
        if (!w->q[i]->done) enable_cb(w->q[i]);
      }
      __atomic_thread_fence(__ATOMIC_SEQ_CST);
      bool pending = false;
      for (unsigned i = 0; i < w->nq && !pending; i++) {
        struct queue *q = w->q[i];
        pending = !q->done && __atomic_load_n(&q->used[1], __ATOMIC_ACQUIRE) != q->last_used;
      }
      if (pending) {
        for (unsigned i = 0; i < w->nq; i++) {
          if (!w->q[i]->done) disable_cb(w->q[i]);
        }
        continue;
      }
      /*
       * Sleep until the device signals one of them. A signal left over from entries already
       * reaped makes poll() return at once; the thread's voluntary context switches count the
       * real sleeps.
       */
      if (measuring) w->polls++;
      if (poll(w->pfd, w->nq, 100) > 0) {
        for (unsigned i = 0; i < w->nq; i++) {
          struct queue *q = w->q[i];
          if (q->done) continue;
          if (w->pfd[i].revents & POLLIN) {
            uint64_t v;
            if (read(q->call_fd, &v, sizeof v) == sizeof v && measuring) q->st.calls += v;
          }
          disable_cb(q);
        }
        continue;
      }
    }
    if (check_stall(w, now_ns())) goto out;
  }
out:
  for (unsigned i = 0; i < w->nq; i++) disable_cb(w->q[i]);
}

void *worker_thread(void *arg) {
  struct worker *w = arg;
  /*
   * Interrupts are off unless the thread is about to sleep. Poll mode never re-enables them
   * (with EVENT_IDX used_event stays where this sets it, so the device crosses it at most once
   * per 65536 completions).
   */
  for (unsigned i = 0; i < w->nq; i++) disable_cb(w->q[i]);
  if (w->o->verify) {
    run_pass(w, PASS_VERIFY_WRITE);
    for (unsigned i = 0; i < w->nq; i++) w->failed |= w->q[i]->failed != 0;
    if (!w->failed) {
      for (unsigned i = 0; i < w->nq; i++) w->q[i]->next_block = w->q[i]->index;
      run_pass(w, PASS_VERIFY_READ);
    }
  } else {
    run_pass(w, PASS_TIMED);
  }
  for (unsigned i = 0; i < w->nq; i++) w->failed |= w->q[i]->failed != 0;
  track_window(w, false);
  return NULL;
}
