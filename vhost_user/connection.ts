/**
 * One vhost-user front-end connection (the back-end side): reads messages
 * from a non-blocking socket as they arrive, in any number of pieces, keeps
 * the protocol state, calls the {@link VhostUserBackend} with checked values
 * and sends replies. The equivalent of libvhost-user's `vu_dispatch` plus
 * its request handlers, driven by readiness: whoever watches the fd (an
 * AioContext on the main thread) calls {@link VhostUserConnection.onReadable}.
 *
 * Bad input never escapes as an exception: a malformed message whose length
 * is known gets an error reply (when the request has a reply or asked for
 * one) and the connection goes on; an oversized or unversioned header, a
 * socket error, or a front-end that does not read its replies closes the
 * connection. Every fd that arrives and is not handed to the backend is closed;
 * a ring fd (kick/call/err) is handed over only if it is an eventfd, made
 * non-blocking first. A front-end that sends faster than the backend handles
 * (a pipelined set-up) is slowed down, not disconnected: a bounded number of
 * messages is read ahead, then reading stops until the backend catches up.
 *
 * @module
 */

import {
  close,
  EINVAL,
  EPROTO,
  fdTarget,
  isEventfd,
  recvMsg,
  sendMsg,
  setNonBlocking,
  SHUT_RDWR,
  shutdown,
  SysError,
  WOULD_BLOCK,
} from "../sys/mod.ts";
import { VIRTQUEUE_MAX_SIZE } from "../virtio/mod.ts";
import type { VhostUserBackend, VhostUserMemoryRegion } from "./backend.ts";
import {
  requestName,
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_GET_CONFIG,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_INFLIGHT_FD,
  VHOST_USER_GET_MAX_MEM_SLOTS,
  VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_GET_QUEUE_NUM,
  VHOST_USER_GET_STATUS,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_MAX_PAYLOAD,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_RESET_DEVICE,
  VHOST_USER_RESET_OWNER,
  VHOST_USER_SET_BACKEND_REQ_FD,
  VHOST_USER_SET_CONFIG,
  VHOST_USER_SET_FEATURES,
  VHOST_USER_SET_INFLIGHT_FD,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_BASE,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_ENABLE,
  VHOST_USER_SET_VRING_ERR,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
  VHOST_USER_VERSION,
  VHOST_VRING_F_LOG,
} from "./constants.ts";
import {
  decodeHeader,
  encodeMessage,
  type MemoryRegionDesc,
  parseMessage,
  VhostUserError,
  type VhostUserHeader,
  type VhostUserMessage,
  type VhostUserPayload,
  vringFdPayload,
} from "./message.ts";

/** Requests whose reply is part of the protocol (not REPLY_ACK). */
const REPLYING = new Set([
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_GET_QUEUE_NUM,
  VHOST_USER_GET_CONFIG,
  VHOST_USER_GET_MAX_MEM_SLOTS,
  VHOST_USER_GET_STATUS,
  VHOST_USER_GET_INFLIGHT_FD,
]);

/**
 * Requests a front-end may send before SET_OWNER: feature negotiation and
 * the queries QEMU's vhost_user_backend_init makes before vhost_dev_init
 * sends SET_OWNER. Everything else belongs to a session, which SET_OWNER
 * starts ("Issued when a new connection is established. It marks the sender
 * as the front-end that owns the session", docs/interop/vhost-user.rst).
 */
const BEFORE_OWNER = new Set([
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_GET_QUEUE_NUM,
  VHOST_USER_GET_MAX_MEM_SLOTS,
  VHOST_USER_SET_OWNER,
  VHOST_USER_RESET_OWNER,
  // QEMU's vhost_user_backend_init sends it before vhost_dev_init's SET_OWNER.
  VHOST_USER_SET_BACKEND_REQ_FD,
]);

/**
 * Messages read ahead of the one being handled (back-pressure). A front-end
 * without REPLY_ACK pipelines its whole set-up (QEMU: SET_VRING_NUM/BASE/
 * ADDR/KICK/CALL for every queue without waiting); once this many are
 * queued the connection stops reading the socket, which leaves the rest in
 * the kernel's socket buffer and, when that fills, blocks the front-end's
 * sendmsg. Reading resumes when the queue is down to half. Memory stays
 * bounded: at most this many parsed messages (each at most
 * VHOST_USER_MAX_PAYLOAD bytes and 8 fds) are held.
 */
const MAX_QUEUED = 64;

/** A queued unit of work: a parsed message or one that failed to parse. */
type Item =
  | { msg: VhostUserMessage; header: VhostUserHeader }
  | { error: VhostUserError; header: VhostUserHeader };

/**
 * What a handler produces: an explicit reply payload, one with fds (closed
 * after sending), or null (ack only).
 */
type Reply = VhostUserPayload | { payload: VhostUserPayload; fds: number[] } | null;

/** Options of a {@link VhostUserConnection}. */
export interface VhostUserConnectionOptions {
  /** Every rejected message, failed backend call and disconnect reason. */
  onError?: (err: Error) => void;
  /** Called first when the connection closes, before its fd is closed: stop watching it. */
  detach?: () => void;
  /** Called once after the connection closed and the backend was reset. */
  onClose?: () => void;
  /**
   * Back-pressure: called with `true` when the connection stops reading its
   * socket (the queue of unhandled messages is full), `false` when it wants
   * to read again. A level-triggered watcher stops watching the fd
   * meanwhile (else it would wake up for data nobody reads) and resumes with
   * `false`; without this option the connection reads again by itself.
   */
  pauseReading?: (paused: boolean) => void;
}

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

function safe(request: number, what: string, v: bigint): number {
  if (v > MAX_SAFE) {
    throw new VhostUserError("BadValue", request, `${what} 0x${v.toString(16)} out of range`);
  }
  return Number(v);
}

function checkRegion(request: number, r: MemoryRegionDesc, fd: number): VhostUserMemoryRegion {
  const gpa = safe(request, "guest address", r.guestPhysAddr);
  const size = safe(request, "region size", r.size);
  const uva = safe(request, "user address", r.userAddr);
  const off = safe(request, "mmap offset", r.mmapOffset);
  if (size === 0) throw new VhostUserError("BadValue", request, "empty memory region");
  for (const [what, base] of [["guest", gpa], ["user", uva], ["offset", off]] as const) {
    if (base + size > Number.MAX_SAFE_INTEGER) {
      throw new VhostUserError("BadValue", request, `${what} range of a region overflows`);
    }
  }
  return { guestPhysAddr: gpa, size, userAddr: uva, mmapOffset: off, fd };
}

/**
 * A kick, call or err fd must be an eventfd (the spec says so, and the data
 * path relies on it): anything else fails in ways that are not the ring's
 * own (a pipe's read end makes the call-fd write fail with EBADF, a full
 * blocking pipe blocks the writing thread forever, a pipe whose writer
 * closed is readable at EOF forever). Type checked through /proc/self/fd
 * (fstat cannot tell an eventfd from other anonymous-inode fds), then made
 * non-blocking: the front-end shares the open file description, and a
 * blocking eventfd whose counter it set near 2^64 - 1 would block our write.
 */
function checkRingFd(request: number, fd: number): void {
  if (!isEventfd(fd)) {
    const what = fdTarget(fd) ?? "unreadable";
    throw new VhostUserError("BadValue", request, `fd is not an eventfd (${what})`);
  }
  setNonBlocking(fd, true);
}

function errnoOf(err: unknown): number {
  return err instanceof SysError ? err.errno : err instanceof VhostUserError ? EPROTO : EINVAL;
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

/**
 * The back-end side of one vhost-user session on a connected, non-blocking
 * socket. The connection owns `fd` and closes it on {@link close}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VhostUserConnection } from "./connection.ts";
 * import type { VhostUserBackend } from "./backend.ts";
 * import { encodeMessage } from "./message.ts";
 * import { VHOST_USER_GET_FEATURES, VHOST_USER_VERSION } from "./constants.ts";
 * import { close, recvMsg, sendMsg, socketpair, SOCK_NONBLOCK } from "../sys/mod.ts";
 * const backend = { features: () => 1n << 32n, numQueues: () => 1 } as unknown as VhostUserBackend;
 * const [front, back] = socketpair(SOCK_NONBLOCK);
 * const conn = new VhostUserConnection(back, backend);
 * sendMsg(front, encodeMessage(VHOST_USER_GET_FEATURES, VHOST_USER_VERSION, { kind: "empty" }));
 * conn.onReadable();
 * const r = recvMsg(front, new Uint8Array(64), 0);
 * assert.equal(r.n, 20);
 * await conn.close();
 * close(front);
 * ```
 */
export class VhostUserConnection {
  /** The connected socket. */
  readonly fd: number;
  readonly #backend: VhostUserBackend;
  readonly #opts: VhostUserConnectionOptions;

  // Read state: header bytes, then payload bytes, with the fds seen so far.
  readonly #hdr = new Uint8Array(VHOST_USER_HDR_SIZE);
  #hdrGot = 0;
  #header: VhostUserHeader | null = null;
  readonly #payload = new Uint8Array(VHOST_USER_MAX_PAYLOAD);
  #payloadGot = 0;
  #fds: number[] = [];
  #fdsTruncated = false;

  readonly #queue: Item[] = [];
  #busy = false;
  /** The asynchronous handler running now (settles, never rejects), or null. */
  #running: Promise<void> | null = null;
  #paused = false;
  #closed = false;
  #closing: Promise<void> | null = null;
  #idleWaiters: (() => void)[] = [];

  // Protocol state.
  #ackedFeatures = 0n;
  #ackedProtocolFeatures = 0n;
  #owner = false;

  constructor(fd: number, backend: VhostUserBackend, opts: VhostUserConnectionOptions = {}) {
    this.fd = fd;
    this.#backend = backend;
    this.#opts = opts;
  }

  /** Whether the connection has closed (front-end gone or protocol failure). */
  get closed(): boolean {
    return this.#closed;
  }

  /** Virtio features acknowledged by SET_FEATURES. */
  get ackedFeatures(): bigint {
    return this.#ackedFeatures;
  }

  /** Protocol features acknowledged by SET_PROTOCOL_FEATURES. */
  get ackedProtocolFeatures(): bigint {
    return this.#ackedProtocolFeatures;
  }

  /** Whether SET_OWNER was received. */
  get owner(): boolean {
    return this.#owner;
  }

  /** Whether reading is paused because {@link MAX_QUEUED} messages wait to be handled. */
  get readingPaused(): boolean {
    return this.#paused;
  }

  /**
   * Reads what the socket has (whole or partial messages) until it is empty
   * or the queue is full, queues the complete ones and handles them in
   * order. Safe to call when nothing is pending (a spurious wake-up) or
   * while paused (reads nothing then).
   */
  onReadable(): void {
    if (this.#closed || this.#paused) return;
    try {
      while (this.#queue.length < MAX_QUEUED && this.#readSome()) { /* keep reading */ }
    } catch (err) {
      this.#report(asError(err));
      void this.close();
      return;
    }
    if (!this.#closed && this.#queue.length >= MAX_QUEUED) {
      this.#paused = true;
      this.#opts.pauseReading?.(true);
    }
    this.#pump();
  }

  /** Resumes reading once the queue is down to half (hysteresis: no epoll_ctl per message). */
  #maybeResume(): void {
    if (!this.#paused || this.#closed || this.#queue.length > MAX_QUEUED / 2) return;
    this.#paused = false;
    if (this.#opts.pauseReading) this.#opts.pauseReading(false);
    else queueMicrotask(() => this.onReadable());
  }

  /** Resolves when every message received so far has been handled. */
  settled(): Promise<void> {
    if (this.#closed || (!this.#busy && this.#queue.length === 0)) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /**
   * Closes the socket and every fd not handed to the backend, waits for the
   * handler still running (a GET_VRING_BASE waiting for in-flight requests),
   * resets the backend, then calls `onClose`. Idempotent; resolves when done.
   */
  close(): Promise<void> {
    if (this.#closing) return this.#closing;
    this.#closed = true;
    this.#closing = (async () => {
      this.#opts.detach?.();
      try {
        shutdown(this.fd, SHUT_RDWR);
      } catch { /* already disconnected */ }
      close(this.fd);
      this.#closeFds(this.#fds);
      this.#fds = [];
      for (const item of this.#queue.splice(0)) if ("msg" in item) this.#closeFds(item.msg.fds);
      this.#wakeIdle();
      // Backend calls never overlap: a reset while a handler still runs would
      // tear down what it works on (a stopping ring's fds and memory).
      if (this.#running !== null) await this.#running;
      try {
        await this.#backend.reset();
      } catch (err) {
        this.#report(asError(err));
      }
      this.#opts.onClose?.();
    })();
    return this.#closing;
  }

  // ---- reading ----------------------------------------------------------------

  /** One recvmsg; returns false when the socket has nothing more (or closed). */
  #readSome(): boolean {
    const inHeader = this.#hdrGot < VHOST_USER_HDR_SIZE;
    const buf = inHeader
      ? this.#hdr.subarray(this.#hdrGot)
      : this.#payload.subarray(this.#payloadGot, this.#header!.size);
    const r = recvMsg(this.fd, buf, VHOST_MEMORY_BASELINE_NREGIONS);
    if (r.fds.length > 0) this.#fds.push(...r.fds);
    if (r.ctrunc) this.#fdsTruncated = true;
    if (r.n === WOULD_BLOCK) return false;
    if (r.n === 0) {
      if (this.#hdrGot > 0) {
        this.#report(
          new VhostUserError("Truncated", this.#header?.request ?? 0, "EOF mid-message"),
        );
      }
      void this.close();
      return false;
    }
    if (inHeader) {
      this.#hdrGot += r.n;
      if (this.#hdrGot < VHOST_USER_HDR_SIZE) return true;
      // Oversized or unversioned: the stream cannot be resynchronised.
      this.#header = decodeHeader(this.#hdr);
      this.#payloadGot = 0;
    } else {
      this.#payloadGot += r.n;
    }
    if (this.#payloadGot === this.#header!.size) this.#completeMessage();
    return true;
  }

  #completeMessage(): void {
    const header = this.#header!;
    const fds = this.#fds;
    this.#fds = [];
    const truncated = this.#fdsTruncated;
    this.#fdsTruncated = false;
    this.#hdrGot = 0;
    this.#header = null;
    let item: Item;
    try {
      if (truncated) {
        throw new VhostUserError("BadFdCount", header.request, "more fds than any message carries");
      }
      const msg = parseMessage(this.#hdr, this.#payload.subarray(0, header.size), fds);
      item = { msg, header };
    } catch (err) {
      this.#closeFds(fds);
      if (!(err instanceof VhostUserError)) throw err;
      item = { error: err, header };
    }
    this.#queue.push(item);
  }

  // ---- dispatch -----------------------------------------------------------------

  #pump(): void {
    while (!this.#busy && !this.#closed && this.#queue.length > 0) {
      const item = this.#queue.shift()!;
      if ("error" in item) {
        this.#fail(item.header, item.error);
        continue;
      }
      let r: Reply | Promise<Reply>;
      try {
        r = this.#dispatch(item.msg);
      } catch (err) {
        this.#fail(item.header, err);
        continue;
      }
      if (r instanceof Promise) {
        this.#busy = true;
        this.#running = r.then(
          (reply) => this.#finish(item.header, reply),
          (err) => this.#fail(item.header, err),
        ).finally(() => {
          this.#busy = false;
          this.#running = null;
          this.#pump();
        });
        this.#maybeResume();
        return;
      }
      this.#finish(item.header, r);
    }
    this.#maybeResume();
    if (!this.#busy && this.#queue.length === 0) this.#wakeIdle();
  }

  #wakeIdle(): void {
    for (const w of this.#idleWaiters.splice(0)) w();
  }

  #ringIndex(request: number, index: number): number {
    const n = this.#backend.numQueues();
    if (!(index < n)) {
      throw new VhostUserError("BadValue", request, `ring ${index} (device has ${n} queues)`);
    }
    return index;
  }

  #dispatch(m: VhostUserMessage): Reply | Promise<Reply> {
    const b = this.#backend;
    const p = m.payload;
    const req = m.request;
    if (!this.#owner && !BEFORE_OWNER.has(req)) {
      this.#closeFds(m.fds);
      throw new VhostUserError("BadValue", req, "refused before SET_OWNER (no session yet)");
    }
    switch (req) {
      case VHOST_USER_GET_FEATURES:
        return { kind: "u64", value: b.features() };
      case VHOST_USER_SET_FEATURES: {
        if (p.kind !== "u64") break;
        const extra = p.value & ~b.features();
        if (extra !== 0n) {
          throw new VhostUserError(
            "BadValue",
            req,
            `features not offered: 0x${extra.toString(16)}`,
          );
        }
        return this.#setFeatures(p.value);
      }
      case VHOST_USER_GET_PROTOCOL_FEATURES:
        if ((b.features() & (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES))) === 0n) {
          throw new VhostUserError("BadValue", req, "protocol features not offered");
        }
        return { kind: "u64", value: b.protocolFeatures() };
      case VHOST_USER_SET_PROTOCOL_FEATURES: {
        if (p.kind !== "u64") break;
        const extra = p.value & ~b.protocolFeatures();
        if (extra !== 0n) {
          throw new VhostUserError(
            "BadValue",
            req,
            `protocol features not offered: 0x${extra.toString(16)}`,
          );
        }
        this.#ackedProtocolFeatures = p.value;
        return this.#ack(b.setProtocolFeatures(p.value));
      }
      case VHOST_USER_SET_OWNER:
        this.#owner = true;
        return null;
      case VHOST_USER_RESET_OWNER:
        // Deprecated; the spec recommends ignoring it.
        return null;
      case VHOST_USER_RESET_DEVICE:
        this.#ackedFeatures = 0n;
        return this.#ack(b.reset());
      case VHOST_USER_GET_QUEUE_NUM:
        return { kind: "u64", value: BigInt(b.numQueues()) };
      case VHOST_USER_GET_MAX_MEM_SLOTS:
        return { kind: "u64", value: BigInt(b.maxMemSlots?.() ?? VHOST_MEMORY_BASELINE_NREGIONS) };
      case VHOST_USER_GET_CONFIG: {
        if (p.kind !== "config") break;
        const size = p.data.byteLength;
        const data = b.getConfig(p.offset, size);
        if (!(data instanceof Uint8Array) || data.byteLength !== size) {
          throw new VhostUserError(
            "BadValue",
            req,
            `config read of ${size} bytes at ${p.offset} failed`,
          );
        }
        return { kind: "config", offset: p.offset, flags: p.flags, data };
      }
      case VHOST_USER_SET_CONFIG:
        if (p.kind !== "config") break;
        return this.#ack(b.setConfig(p.offset, p.data, p.flags));
      case VHOST_USER_SET_MEM_TABLE: {
        if (p.kind !== "memTable") break;
        return this.#setMemTable(p.regions, m.fds);
      }
      case VHOST_USER_SET_VRING_NUM: {
        if (p.kind !== "vringState") break;
        const i = this.#ringIndex(req, p.index);
        if (p.num === 0 || p.num > VIRTQUEUE_MAX_SIZE || (p.num & (p.num - 1)) !== 0) {
          throw new VhostUserError("BadValue", req, `ring size ${p.num}`);
        }
        return this.#ack(b.setVringNum(i, p.num));
      }
      case VHOST_USER_SET_VRING_ADDR: {
        if (p.kind !== "vringAddr") break;
        const i = this.#ringIndex(req, p.index);
        if ((p.flags & ~VHOST_VRING_F_LOG) !== 0) {
          throw new VhostUserError("BadValue", req, `vring flags 0x${p.flags.toString(16)}`);
        }
        return this.#ack(b.setVringAddr(i, {
          flags: p.flags,
          descUserAddr: safe(req, "descriptor table", p.descUserAddr),
          usedUserAddr: safe(req, "used ring", p.usedUserAddr),
          availUserAddr: safe(req, "available ring", p.availUserAddr),
          logGuestAddr: safe(req, "log address", p.logGuestAddr),
        }));
      }
      case VHOST_USER_SET_VRING_BASE: {
        if (p.kind !== "vringState") break;
        const i = this.#ringIndex(req, p.index);
        if (p.num > 0xffff) throw new VhostUserError("BadValue", req, `ring base ${p.num}`);
        return this.#ack(b.setVringBase(i, p.num));
      }
      case VHOST_USER_GET_VRING_BASE: {
        if (p.kind !== "vringState") break;
        const i = this.#ringIndex(req, p.index);
        const base = b.getVringBase(i);
        const reply = (n: number): Reply => ({ kind: "vringState", index: i, num: n });
        return base instanceof Promise ? base.then(reply) : reply(base);
      }
      case VHOST_USER_SET_VRING_KICK:
      case VHOST_USER_SET_VRING_CALL:
      case VHOST_USER_SET_VRING_ERR: {
        if (p.kind !== "u64") break;
        const { index, noFd } = vringFdPayload(p.value);
        const fd = noFd ? null : m.fds[0];
        try {
          this.#ringIndex(req, index);
          if (fd !== null) checkRingFd(req, fd);
        } catch (err) {
          this.#closeFds(m.fds);
          throw err;
        }
        // From here on the backend owns the fd.
        const r = req === VHOST_USER_SET_VRING_KICK
          ? b.setVringKick(index, fd)
          : req === VHOST_USER_SET_VRING_CALL
          ? b.setVringCall(index, fd)
          : b.setVringErr(index, fd);
        return this.#ack(r);
      }
      case VHOST_USER_GET_INFLIGHT_FD: {
        if (p.kind !== "inflight") break;
        if (b.getInflightFd === undefined) break;
        const r = b.getInflightFd(p.numQueues, p.queueSize);
        return {
          payload: {
            kind: "inflight",
            mmapSize: BigInt(r.mmapSize),
            mmapOffset: BigInt(r.mmapOffset),
            numQueues: r.numQueues,
            queueSize: r.queueSize,
          },
          fds: [r.fd],
        };
      }
      case VHOST_USER_SET_INFLIGHT_FD: {
        if (p.kind !== "inflight" || b.setInflightFd === undefined) break;
        const fd = m.fds[0];
        let inflight;
        try {
          inflight = {
            fd,
            mmapSize: safe(req, "inflight size", p.mmapSize),
            mmapOffset: safe(req, "inflight offset", p.mmapOffset),
            numQueues: p.numQueues,
            queueSize: p.queueSize,
          };
        } catch (err) {
          this.#closeFds(m.fds);
          throw err;
        }
        // From here on the backend owns the fd.
        return this.#ack(b.setInflightFd(inflight));
      }
      case VHOST_USER_SET_BACKEND_REQ_FD: {
        // The backend takes the fd (or throws, and the fd is closed below).
        if (b.setBackendReqFd === undefined || m.fds.length !== 1) break;
        try {
          return this.#ack(b.setBackendReqFd(m.fds[0]));
        } catch (e) {
          this.#closeFds(m.fds);
          throw e;
        }
      }
      case VHOST_USER_SET_VRING_ENABLE: {
        if (p.kind !== "vringState") break;
        const i = this.#ringIndex(req, p.index);
        if (p.num > 1) throw new VhostUserError("BadValue", req, `enable ${p.num}`);
        return this.#ack(b.setVringEnable(i, p.num === 1));
      }
    }
    this.#closeFds(m.fds);
    throw new VhostUserError("BadValue", req, "request not supported by this back-end");
  }

  #ack(r: void | Promise<void>): Reply | Promise<Reply> {
    return r instanceof Promise ? r.then(() => null) : null;
  }

  async #setFeatures(features: bigint): Promise<Reply> {
    await this.#backend.setFeatures(features);
    this.#ackedFeatures = features;
    // Without protocol features a ring is enabled from the start ("Ring states").
    if ((features & (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES))) === 0n) {
      for (let i = 0; i < this.#backend.numQueues(); i++) {
        await this.#backend.setVringEnable(i, true);
      }
    }
    return null;
  }

  async #setMemTable(descs: MemoryRegionDesc[], fds: number[]): Promise<Reply> {
    try {
      const regions = descs.map((d, i) => checkRegion(VHOST_USER_SET_MEM_TABLE, d, fds[i]));
      await this.#backend.setMemTable(regions);
      return null;
    } finally {
      this.#closeFds(fds);
    }
  }

  // ---- replies --------------------------------------------------------------------

  /**
   * Whether a request without a reply of its own gets a REPLY_ACK: only when
   * NEED_REPLY is set and REPLY_ACK was negotiated ("REPLY_ACK" in
   * docs/interop/vhost-user.rst; libvhost-user's vu_dispatch checks both).
   * A front-end that did not negotiate it does not expect the reply, and an
   * unexpected one would be taken for the answer to its next getter.
   */
  #wantsAck(header: VhostUserHeader): boolean {
    return (header.flags & VHOST_USER_NEED_REPLY_MASK) !== 0 &&
      (this.#ackedProtocolFeatures & (1n << BigInt(VHOST_USER_PROTOCOL_F_REPLY_ACK))) !== 0n;
  }

  #finish(header: VhostUserHeader, reply: Reply): void {
    if (reply !== null && "fds" in reply) {
      if (!this.#closed && REPLYING.has(header.request)) {
        this.#send(header.request, reply.payload, reply.fds);
      }
      this.#closeFds(reply.fds); // the receiver has its own copies
      return;
    }
    if (this.#closed) return;
    if (REPLYING.has(header.request)) {
      this.#send(header.request, reply ?? { kind: "empty" });
    } else if (this.#wantsAck(header)) {
      this.#send(header.request, { kind: "u64", value: 0n });
    }
  }

  #fail(header: VhostUserHeader, err: unknown): void {
    const e = asError(err);
    this.#report(e);
    if (this.#closed) return;
    if (REPLYING.has(header.request)) {
      // A reply of the wrong size (here: empty) is how the spec signals a
      // failed GET_CONFIG; for the other getters the front-end sees a
      // malformed reply and gives up on the back-end, which is what we want.
      this.#send(header.request, { kind: "empty" });
    } else if (this.#wantsAck(header)) {
      this.#send(header.request, { kind: "u64", value: BigInt(errnoOf(err)) });
    }
  }

  #send(request: number, payload: VhostUserPayload, fds: readonly number[] = []): void {
    const bytes = encodeMessage(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload);
    let n: number;
    try {
      n = sendMsg(this.fd, bytes, fds);
    } catch (err) {
      this.#report(asError(err));
      void this.close();
      return;
    }
    if (n !== bytes.byteLength) {
      // Replies are tiny; a full socket means the front-end stopped reading.
      this.#report(
        new VhostUserError(
          "BadValue",
          request,
          `front-end is not reading replies (${requestName(request)})`,
        ),
      );
      void this.close();
    }
  }

  #report(err: Error): void {
    this.#opts.onError?.(err);
  }

  #closeFds(fds: readonly number[]): void {
    for (const fd of fds) {
      try {
        close(fd);
      } catch { /* already closed */ }
    }
  }
}
