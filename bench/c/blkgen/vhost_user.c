/*
 * blkgen: the vhost-user control channel, front-end side (what QEMU's
 * hw/virtio/vhost-user.c and vhost-user-blk.c do for a device): messages
 * with an optional fd, REPLY_ACK, and the set-up sequence. Message numbers,
 * payload layouts and flags follow QEMU's docs/interop/vhost-user.rst.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "blkgen.h"

/* Message types ("Front-end message types"). */
enum {
  VHOST_USER_GET_FEATURES = 1,
  VHOST_USER_SET_FEATURES = 2,
  VHOST_USER_SET_OWNER = 3,
  VHOST_USER_SET_MEM_TABLE = 5,
  VHOST_USER_SET_VRING_NUM = 8,
  VHOST_USER_SET_VRING_ADDR = 9,
  VHOST_USER_SET_VRING_BASE = 10,
  VHOST_USER_GET_VRING_BASE = 11,
  VHOST_USER_SET_VRING_KICK = 12,
  VHOST_USER_SET_VRING_CALL = 13,
  VHOST_USER_GET_PROTOCOL_FEATURES = 15,
  VHOST_USER_SET_PROTOCOL_FEATURES = 16,
  VHOST_USER_GET_QUEUE_NUM = 17,
  VHOST_USER_SET_VRING_ENABLE = 18,
  VHOST_USER_GET_CONFIG = 24,
};

/* Header flags: version 1, reply, need reply. */
#define VHOST_USER_VERSION 0x1
#define VHOST_USER_REPLY_MASK 0x4
#define VHOST_USER_NEED_REPLY_MASK 0x8
#define VHOST_USER_F_PROTOCOL_FEATURES 30
#define VHOST_USER_PROTOCOL_F_MQ 0
#define VHOST_USER_PROTOCOL_F_REPLY_ACK 3
#define VHOST_USER_PROTOCOL_F_CONFIG 9
#define VHOST_USER_HDR_SIZE 12
#define VHOST_USER_MAX_PAYLOAD 4096

static const char *request_name(uint32_t r) {
  switch (r) {
  case VHOST_USER_GET_FEATURES: return "GET_FEATURES";
  case VHOST_USER_SET_FEATURES: return "SET_FEATURES";
  case VHOST_USER_SET_OWNER: return "SET_OWNER";
  case VHOST_USER_SET_MEM_TABLE: return "SET_MEM_TABLE";
  case VHOST_USER_SET_VRING_NUM: return "SET_VRING_NUM";
  case VHOST_USER_SET_VRING_ADDR: return "SET_VRING_ADDR";
  case VHOST_USER_SET_VRING_BASE: return "SET_VRING_BASE";
  case VHOST_USER_GET_VRING_BASE: return "GET_VRING_BASE";
  case VHOST_USER_SET_VRING_KICK: return "SET_VRING_KICK";
  case VHOST_USER_SET_VRING_CALL: return "SET_VRING_CALL";
  case VHOST_USER_GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES";
  case VHOST_USER_SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
  case VHOST_USER_GET_QUEUE_NUM: return "GET_QUEUE_NUM";
  case VHOST_USER_SET_VRING_ENABLE: return "SET_VRING_ENABLE";
  case VHOST_USER_GET_CONFIG: return "GET_CONFIG";
  default: return "?";
  }
}

/* Sends header + payload, with fd (if >= 0) as SCM_RIGHTS. */
static void send_msg(struct device *d, uint32_t request, uint32_t flags, const void *payload,
                     uint32_t size, int fd) {
  uint32_t hdr[3] = {request, VHOST_USER_VERSION | flags, size};
  struct iovec iov[2] = {{hdr, sizeof hdr}, {(void *)payload, size}};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int))];
  } control;
  struct msghdr mh = {.msg_iov = iov, .msg_iovlen = size ? 2 : 1};
  if (fd >= 0) {
    memset(&control, 0, sizeof control);
    mh.msg_control = control.buf;
    mh.msg_controllen = sizeof control.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
  }
  ssize_t n;
  do n = sendmsg(d->sock, &mh, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n != (ssize_t)(sizeof hdr + size)) {
    die(1, "sending %s: %s", request_name(request), n < 0 ? strerror(errno) : "short write");
  }
}

/* Reads exactly len bytes, waiting at most timeout_ms for each part. False on timeout. */
static bool read_exact(struct device *d, void *buf, size_t len, unsigned timeout_ms,
                       const char *what) {
  size_t got = 0;
  while (got < len) {
    struct pollfd p = {.fd = d->sock, .events = POLLIN};
    int r = poll(&p, 1, (int)timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) return false;
    ssize_t n = recv(d->sock, (char *)buf + got, len - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) die(1, "reading the reply to %s: %s", what, n < 0 ? strerror(errno) : "back-end closed the connection");
    got += (size_t)n;
  }
  return true;
}

/* Reads the reply to request into payload (at most cap bytes); returns its size. */
static uint32_t read_reply(struct device *d, uint32_t request, void *payload, uint32_t cap,
                           unsigned timeout_ms, bool *timed_out) {
  uint32_t hdr[3];
  const char *name = request_name(request);
  if (!read_exact(d, hdr, sizeof hdr, timeout_ms, name) ) {
    if (timed_out) {
      *timed_out = true;
      return 0;
    }
    die(2, "the back-end did not answer %s within %u ms", name, timeout_ms);
  }
  if (hdr[0] != request || !(hdr[1] & VHOST_USER_REPLY_MASK)) {
    die(1, "expected a reply to %s, got request %u flags 0x%x", name, hdr[0], hdr[1]);
  }
  if (hdr[2] > VHOST_USER_MAX_PAYLOAD) die(1, "reply to %s: payload of %u bytes", name, hdr[2]);
  uint8_t body[VHOST_USER_MAX_PAYLOAD];
  if (!read_exact(d, body, hdr[2], timeout_ms, name)) {
    die(2, "the back-end did not finish its reply to %s within %u ms", name, timeout_ms);
  }
  uint32_t n = hdr[2] < cap ? hdr[2] : cap;
  memcpy(payload, body, n);
  return hdr[2];
}

/* A request without a reply of its own: with REPLY_ACK, ask for the ack and check it. */
static void request_noreply(struct device *d, uint32_t request, const void *payload,
                            uint32_t size, int fd) {
  send_msg(d, request, d->reply_ack ? VHOST_USER_NEED_REPLY_MASK : 0, payload, size, fd);
  if (!d->reply_ack) return;
  uint64_t ack = 0;
  if (read_reply(d, request, &ack, sizeof ack, d->timeout_ms, NULL) != 8) {
    die(1, "REPLY_ACK of %s has the wrong size", request_name(request));
  }
  if (ack != 0) die(1, "the back-end refused %s (ack %llu)", request_name(request), (unsigned long long)ack);
}

static uint64_t request_u64(struct device *d, uint32_t request) {
  uint64_t v = 0;
  send_msg(d, request, 0, NULL, 0, -1);
  if (read_reply(d, request, &v, sizeof v, d->timeout_ms, NULL) != 8) {
    die(1, "reply to %s is not a u64", request_name(request));
  }
  return v;
}

static void send_u64(struct device *d, uint32_t request, uint64_t v, int fd) {
  request_noreply(d, request, &v, sizeof v, fd);
}

static void send_state(struct device *d, uint32_t request, uint32_t index, uint32_t num) {
  uint32_t s[2] = {index, num};
  request_noreply(d, request, s, sizeof s, -1);
}

#define BIT(n) ((uint64_t)1 << (n))

static void read_config(struct device *d) {
  /* struct { u32 offset, size, flags; u8 payload[size]; } */
  uint8_t msg[12 + VIRTIO_BLK_CONFIG_SIZE] = {0};
  uint32_t hdr[3] = {0, VIRTIO_BLK_CONFIG_SIZE, 0};
  memcpy(msg, hdr, sizeof hdr);
  send_msg(d, VHOST_USER_GET_CONFIG, 0, msg, sizeof msg, -1);
  uint8_t reply[12 + VIRTIO_BLK_CONFIG_SIZE] = {0};
  uint32_t n = read_reply(d, VHOST_USER_GET_CONFIG, reply, sizeof reply,
                          d->timeout_ms, NULL);
  if (n < sizeof reply) die(1, "GET_CONFIG failed (reply of %u bytes)", n);
  const uint8_t *c = reply + 12;
  memcpy(&d->capacity, c + VIRTIO_BLK_CONFIG_CAPACITY, 8);
  if (d->offered & BIT(VIRTIO_BLK_F_BLK_SIZE)) memcpy(&d->blk_size, c + VIRTIO_BLK_CONFIG_BLK_SIZE, 4);
  if (d->offered & BIT(VIRTIO_BLK_F_SEG_MAX)) memcpy(&d->seg_max, c + VIRTIO_BLK_CONFIG_SEG_MAX, 4);
}

void device_connect(struct device *d, const struct options *o) {
  memset(d, 0, sizeof *d);
  d->memfd = -1;
  /* Answers to control messages come back at once; --timeout-ms is "never". */
  d->timeout_ms = o->timeout_ms;
  d->blk_size = VIRTIO_BLK_SECTOR;
  d->max_queues = 1;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(o->socket) >= sizeof sa.sun_path) die(1, "socket path too long: %s", o->socket);
  strcpy(sa.sun_path, o->socket);
  d->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (d->sock < 0) die(1, "socket: %s", strerror(errno));
  if (connect(d->sock, (struct sockaddr *)&sa, sizeof sa) < 0) {
    die(1, "connect %s: %s", o->socket, strerror(errno));
  }

  d->offered = request_u64(d, VHOST_USER_GET_FEATURES);
  if (!(d->offered & BIT(VIRTIO_F_VERSION_1))) die(1, "the back-end does not offer VIRTIO_F_VERSION_1");
  uint64_t want = BIT(VIRTIO_F_VERSION_1) | BIT(VHOST_USER_F_PROTOCOL_FEATURES) |
                  BIT(VIRTIO_BLK_F_SIZE_MAX) | BIT(VIRTIO_BLK_F_SEG_MAX) |
                  BIT(VIRTIO_BLK_F_BLK_SIZE) | BIT(VIRTIO_BLK_F_FLUSH) | BIT(VIRTIO_BLK_F_RO);
  if (o->event_idx) want |= BIT(VIRTIO_RING_F_EVENT_IDX);
  if (o->indirect) want |= BIT(VIRTIO_RING_F_INDIRECT_DESC);
  if (o->queues > 1) want |= BIT(VIRTIO_BLK_F_MQ);
  d->features = d->offered & want;
  if (o->event_idx && !(d->features & BIT(VIRTIO_RING_F_EVENT_IDX))) {
    die(1, "--event-idx on: the back-end does not offer VIRTIO_RING_F_EVENT_IDX");
  }
  if (o->indirect && !(d->features & BIT(VIRTIO_RING_F_INDIRECT_DESC))) {
    die(1, "--indirect on: the back-end does not offer VIRTIO_RING_F_INDIRECT_DESC");
  }

  if (d->features & BIT(VHOST_USER_F_PROTOCOL_FEATURES)) {
    uint64_t p = request_u64(d, VHOST_USER_GET_PROTOCOL_FEATURES);
    d->protocol_features = p & (BIT(VHOST_USER_PROTOCOL_F_MQ) | BIT(VHOST_USER_PROTOCOL_F_REPLY_ACK) |
                                BIT(VHOST_USER_PROTOCOL_F_CONFIG));
    send_u64(d, VHOST_USER_SET_PROTOCOL_FEATURES, d->protocol_features, -1);
    d->reply_ack = (d->protocol_features & BIT(VHOST_USER_PROTOCOL_F_REPLY_ACK)) != 0;
  }
  if (d->protocol_features & BIT(VHOST_USER_PROTOCOL_F_MQ)) {
    d->max_queues = (unsigned)request_u64(d, VHOST_USER_GET_QUEUE_NUM);
  }
  if (o->queues > d->max_queues) {
    die(1, "--queues %u: the back-end has %u queue(s)", o->queues, d->max_queues);
  }
  if (o->queues > 1 && !(d->features & BIT(VIRTIO_BLK_F_MQ))) {
    die(1, "--queues %u: the back-end does not offer VIRTIO_BLK_F_MQ", o->queues);
  }
  request_noreply(d, VHOST_USER_SET_OWNER, NULL, 0, -1);
  if (!(d->protocol_features & BIT(VHOST_USER_PROTOCOL_F_CONFIG))) {
    die(1, "the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG (needed for the capacity)");
  }
  read_config(d);
  send_u64(d, VHOST_USER_SET_FEATURES, d->features, -1);
}

void device_set_mem_table(struct device *d) {
  /* struct { u32 nregions, padding; { u64 guest_phys_addr, memory_size, userspace_addr, mmap_offset } } */
  uint64_t msg[1 + 4] = {1, 0, d->mem_size, (uint64_t)(uintptr_t)d->mem, 0};
  request_noreply(d, VHOST_USER_SET_MEM_TABLE, msg, sizeof msg, d->memfd);
}

void device_setup_vring(struct device *d, struct queue *q) {
  send_state(d, VHOST_USER_SET_VRING_NUM, q->index, q->num);
  send_state(d, VHOST_USER_SET_VRING_BASE, q->index, 0);
  /* struct { u32 index, flags; u64 desc, used, avail, log } in the front-end's addresses. */
  struct {
    uint32_t index, flags;
    uint64_t desc, used, avail, log;
  } addr = {q->index, 0, (uint64_t)(uintptr_t)q->desc, (uint64_t)(uintptr_t)q->used,
            (uint64_t)(uintptr_t)q->avail, 0};
  request_noreply(d, VHOST_USER_SET_VRING_ADDR, &addr, sizeof addr, -1);
  send_u64(d, VHOST_USER_SET_VRING_KICK, q->index, q->kick_fd);
  send_u64(d, VHOST_USER_SET_VRING_CALL, q->index, q->call_fd);
}

void device_enable_vring(struct device *d, unsigned index, bool on) {
  if (d->features & BIT(VHOST_USER_F_PROTOCOL_FEATURES)) {
    send_state(d, VHOST_USER_SET_VRING_ENABLE, index, on ? 1 : 0);
  }
}

bool device_stop_vring(struct device *d, unsigned index, unsigned timeout_ms) {
  uint32_t s[2] = {index, 0};
  send_msg(d, VHOST_USER_GET_VRING_BASE, 0, s, sizeof s, -1);
  bool timed_out = false;
  read_reply(d, VHOST_USER_GET_VRING_BASE, s, sizeof s, timeout_ms, &timed_out);
  return !timed_out;
}

void device_close(struct device *d) {
  if (d->sock >= 0) close(d->sock);
  d->sock = -1;
}
