/**
 * The seam between the vhost-user protocol (connection, server) and the
 * device that serves the rings: the idea of rust-vmm's `VhostUserBackend`
 * trait, written for this project. The connection validates and decodes every
 * message, keeps the protocol state (negotiated features, which rings exist,
 * enable rules), and calls these methods with checked, typed values.
 *
 * Methods may return a Promise (a backend that forwards to an IOThread);
 * the connection awaits it before handling the next message, and before
 * {@link VhostUserBackend.reset} when the front-end leaves: calls never
 * overlap. A method that
 * throws (or rejects) makes the request fail: an error reply when the
 * front-end asked for one (REPLY_ACK), otherwise the error is reported
 * through the server's `onError`.
 *
 * File descriptors: the fds of {@link VhostUserBackend.setMemTable} are
 * closed by the connection after the call returns (mmap keeps its own
 * reference; dup them to keep them). The kick/call/err fds belong to the
 * backend from the call on, whether it returns or throws: it closes them when
 * they are replaced, on {@link VhostUserBackend.reset}, or on error. They are
 * always non-blocking eventfds: the connection refuses any other fd.
 *
 * @module
 */

/**
 * One guest memory region from SET_MEM_TABLE, range-checked: every field is a
 * safe integer, `size > 0`, and neither `guestPhysAddr + size`,
 * `userAddr + size` nor `mmapOffset + size` exceeds 2^53. Same shape as
 * virtio's `MemoryRegion` (docs/design.md).
 */
export interface VhostUserMemoryRegion {
  /** Guest physical address of the first byte (descriptors use these). */
  guestPhysAddr: number;
  /** Length in bytes. */
  size: number;
  /** Front-end virtual address of the first byte (SET_VRING_ADDR uses these). */
  userAddr: number;
  /** Offset of the region in `fd`. */
  mmapOffset: number;
  /** The memory fd (closed by the connection after setMemTable returns). */
  fd: number;
}

/** SET_VRING_ADDR: the ring's parts as front-end virtual addresses (safe integers). */
export interface VhostUserVringAddr {
  /** VHOST_VRING_F_LOG or 0. */
  flags: number;
  /** Descriptor table. */
  descUserAddr: number;
  /** Used ring. */
  usedUserAddr: number;
  /** Available ring. */
  availUserAddr: number;
  /** Guest address for used-ring dirty logging (unused without LOG_ALL). */
  logGuestAddr: number;
}

/**
 * An inflight region ("Inflight description" plus its fd): the reply to
 * GET_INFLIGHT_FD, the request of SET_INFLIGHT_FD. Sizes are checked to be
 * safe integers by the connection.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VhostUserInflight } from "./backend.ts";
 * const i: VhostUserInflight = { fd: 9, mmapSize: 4160, mmapOffset: 0, numQueues: 1, queueSize: 256 };
 * assert.equal(i.numQueues, 1);
 * ```
 */
export interface VhostUserInflight {
  /** The region's memfd. */
  fd: number;
  /** Bytes of the region. */
  mmapSize: number;
  /** Offset of the region in `fd`. */
  mmapOffset: number;
  /** Queues the region covers. */
  numQueues: number;
  /** Entries per queue the region has room for. */
  queueSize: number;
}

/**
 * What the connection calls (one vhost-user session's requests, checked
 * and typed). A device usually does not implement this itself: it implements
 * `VhostUserDevice` and runs under a `VhostUserHandler` (vhost_user/handler.ts),
 * which keeps the ring state. Ring indexes passed in are already
 * checked against {@link VhostUserBackend.numQueues}; ring sizes are powers of
 * two in 1..32768.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VhostUserBackend } from "./backend.ts";
 * const nullBackend: VhostUserBackend = {
 *   features: () => 1n << 32n,
 *   protocolFeatures: () => 0n,
 *   numQueues: () => 1,
 *   setFeatures() {},
 *   setProtocolFeatures() {},
 *   getConfig: (_offset, size) => new Uint8Array(size),
 *   setConfig() {},
 *   setMemTable() {},
 *   setVringNum() {},
 *   setVringAddr() {},
 *   setVringBase() {},
 *   getVringBase: () => Promise.resolve(0),
 *   setVringKick() {},
 *   setVringCall() {},
 *   setVringErr() {},
 *   setVringEnable() {},
 *   reset() {},
 * };
 * assert.equal(nullBackend.numQueues(), 1);
 * ```
 */
export interface VhostUserBackend {
  /** Virtio + vhost-user feature bits offered (GET_FEATURES); include bit 30 to speak protocol features. */
  features(): bigint;
  /** Protocol feature bits offered (GET_PROTOCOL_FEATURES). */
  protocolFeatures(): bigint;
  /** Number of queues (GET_QUEUE_NUM, and the bound on ring indexes). */
  numQueues(): number;
  /** Memory slots for GET_MAX_MEM_SLOTS (default 8). */
  maxMemSlots?(): number;
  /**
   * SET_BACKEND_REQ_FD (optional; a backend offering
   * VHOST_USER_PROTOCOL_F_BACKEND_REQ implements it): the back-end request
   * channel's socket. The backend owns the fd once this returns; if it
   * throws, the connection closes the fd.
   */
  setBackendReqFd?(fd: number): void | Promise<void>;
  /** Acknowledged features (a subset of features(), checked). */
  setFeatures(features: bigint): void | Promise<void>;
  /** Acknowledged protocol features (a subset of protocolFeatures(), checked). */
  setProtocolFeatures(features: bigint): void | Promise<void>;
  /** `size` bytes of device config space at `offset` (size <= 256); must return exactly `size` bytes. */
  getConfig(offset: number, size: number): Uint8Array;
  /** Guest (flags 0) or migration (flags 1) write to config space. */
  setConfig(offset: number, data: Uint8Array, flags: number): void | Promise<void>;
  /** Replace the memory map: mmap every region (see the module doc for fd ownership). */
  setMemTable(regions: VhostUserMemoryRegion[]): void | Promise<void>;
  /** Ring size. */
  setVringNum(index: number, num: number): void | Promise<void>;
  /** Ring addresses (front-end virtual addresses; translate through the memory table). */
  setVringAddr(index: number, addr: VhostUserVringAddr): void | Promise<void>;
  /** Next avail index to process (0..65535). */
  setVringBase(index: number, base: number): void | Promise<void>;
  /** Stop the ring after its in-flight requests complete; resolve with the next avail index. */
  getVringBase(index: number): number | Promise<number>;
  /** Kick eventfd (null: no fd, poll the ring); starts the ring. The backend owns `fd`. */
  setVringKick(index: number, fd: number | null): void | Promise<void>;
  /** Call eventfd (null: no notifications). The backend owns `fd`. */
  setVringCall(index: number, fd: number | null): void | Promise<void>;
  /** Error eventfd (null: none). The backend owns `fd`. */
  setVringErr(index: number, fd: number | null): void | Promise<void>;
  /** Enable or disable a ring (rings start disabled when protocol features are negotiated). */
  setVringEnable(index: number, enabled: boolean): void | Promise<void>;
  /**
   * GET_INFLIGHT_FD (INFLIGHT_SHMFD negotiated): a new region for
   * `numQueues` rings of `queueSize` entries. The connection sends the fd
   * with the reply and closes it afterwards.
   */
  getInflightFd?(numQueues: number, queueSize: number): VhostUserInflight;
  /** SET_INFLIGHT_FD: the region kept by the front-end. The backend owns `fd`. */
  setInflightFd?(inflight: VhostUserInflight): void | Promise<void>;
  /** Stop every ring, unmap memory, close kept fds: the front-end went away or sent RESET_DEVICE. */
  reset(): void | Promise<void>;
}
