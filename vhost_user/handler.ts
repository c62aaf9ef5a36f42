/**
 * The library half of a vhost-user back-end: a {@link VhostUserBackend} (what
 * the connection calls) that owns the ring state, so a device implements
 * only device concerns ({@link VhostUserDevice}: features, config, memory,
 * queue start and stop). The split of rust-vmm's vhost-user-backend crate,
 * where `VhostUserHandler` keeps the vrings and calls the device's
 * `VhostUserBackend` trait, written for this project.
 *
 * The handler collects SET_VRING_NUM/ADDR/BASE/CALL/ERR/ENABLE per ring,
 * starts a ring in the device on SET_VRING_KICK, stops it on GET_VRING_BASE,
 * forwards call/err/enable changes to a running ring, owns every ring fd
 * (closing one only after the device was told about its replacement), and
 * on reset stops the rings before the device drops its state. It also keeps
 * the inflight region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD
 * (GET_INFLIGHT_FD allocates it, SET_INFLIGHT_FD maps the one the front-end
 * kept) and hands each ring its part.
 *
 * @module
 */

import {
  close,
  eventfdWrite,
  fstat,
  ftruncate,
  type MappedRegion,
  memfdCreate,
  MFD_ALLOW_SEALING,
  mmapShared,
  sealShrink,
} from "../sys/mod.ts";
import { featureBit, inflightQueueRegionSize, VIRTQUEUE_MAX_SIZE } from "../virtio/mod.ts";
import type {
  VhostUserBackend,
  VhostUserInflight,
  VhostUserMemoryRegion,
  VhostUserVringAddr,
} from "./backend.ts";
import { VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD } from "./constants.ts";

/**
 * Where a ring's part of the inflight region is: a host address valid in
 * every thread of the process, and the queue size the region was made for
 * (at least the ring's size).
 */
export interface VringInflight {
  /** Host address of the queue's region (QueueRegionSplit). */
  addr: number;
  /** Entries the region has room for. */
  queueSize: number;
}

/**
 * Everything a device needs to start one ring, as collected by the handler
 * (SET_VRING_NUM/ADDR/BASE/CALL/ERR/ENABLE, then KICK).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VringSetup } from "./handler.ts";
 * const s: VringSetup = {
 *   index: 0, num: 256, base: 0, kickFd: 7, callFd: 8, errFd: null, enabled: true, inflight: null,
 *   addr: { flags: 0, descUserAddr: 0x1000, availUserAddr: 0x2000, usedUserAddr: 0x3000, logGuestAddr: 0 },
 * };
 * assert.equal(s.num, 256);
 * ```
 */
export interface VringSetup {
  /** Ring index. */
  index: number;
  /** Ring size (power of two, at most the device's {@link VhostUserDevice.maxQueueSize}). */
  num: number;
  /** Ring addresses (front-end virtual addresses). */
  addr: VhostUserVringAddr;
  /**
   * Next avail index to take (SET_VRING_BASE), or -1: the front-end replaced
   * the kick fd of a running ring without a new SET_VRING_BASE, so the ring
   * goes on from where it is (rewinding would replay requests).
   */
  base: number;
  /** Kick eventfd (owned by the handler; the device only polls it). */
  kickFd: number;
  /** Call eventfd, or null. */
  callFd: number | null;
  /** Error eventfd, or null. */
  errFd: number | null;
  /** SET_VRING_ENABLE state. */
  enabled: boolean;
  /** The ring's inflight log, when INFLIGHT_SHMFD is in use; else null. */
  inflight: VringInflight | null;
}

/** A change to a running ring (SET_VRING_CALL / SET_VRING_ERR / SET_VRING_ENABLE). */
export interface VringUpdate {
  callFd?: number | null;
  errFd?: number | null;
  enabled?: boolean;
}

/**
 * What a vhost-user device implements under a {@link VhostUserHandler}:
 * device concerns only. Any method may return a Promise; the handler awaits
 * it, and calls never overlap. Fds passed in belong to the handler.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VhostUserDevice } from "./handler.ts";
 * const dev: VhostUserDevice = {
 *   features: () => 1n << 32n,
 *   protocolFeatures: () => 0n,
 *   numQueues: () => 1,
 *   setFeatures() {},
 *   setProtocolFeatures() {},
 *   getConfig: (_offset, size) => new Uint8Array(size),
 *   setConfig() {},
 *   setMemTable() {},
 *   startQueue() {},
 *   stopQueue: () => 0,
 *   updateQueue() {},
 *   reset() {},
 * };
 * assert.equal(dev.numQueues(), 1);
 * ```
 */
export interface VhostUserDevice {
  /** Virtio + vhost-user feature bits offered (GET_FEATURES). */
  features(): bigint;
  /** Protocol features offered; the handler adds the ones it implements (INFLIGHT_SHMFD). */
  protocolFeatures(): bigint;
  /** Number of queues. */
  numQueues(): number;
  /** Memory slots for GET_MAX_MEM_SLOTS (default 8). */
  maxMemSlots?(): number;
  /** Largest ring SET_VRING_NUM accepts (default 32768). */
  maxQueueSize?(): number;
  /** Acknowledged features. */
  setFeatures(features: bigint): void | Promise<void>;
  /** Acknowledged protocol features. */
  setProtocolFeatures(features: bigint): void | Promise<void>;
  /** Config space read (exactly `size` bytes). */
  getConfig(offset: number, size: number): Uint8Array;
  /** Config space write. */
  setConfig(offset: number, data: Uint8Array, flags: number): void | Promise<void>;
  /** Replace the memory map (fds closed by the connection after the call). */
  setMemTable(regions: VhostUserMemoryRegion[]): void | Promise<void>;
  /**
   * Start (or restart, with a new kick fd) a ring. Throws when refused; a
   * ring that was running then goes on as before (old kick fd, position).
   */
  startQueue(setup: VringSetup): void | Promise<void>;
  /**
   * Stop a ring after its in-flight requests; the next avail index. Also
   * called for a ring the device stopped by itself (it answers where that
   * ring stopped).
   */
  stopQueue(index: number): number | Promise<number>;
  /** Apply a change to a running ring (a no-op for a ring that is not running). */
  updateQueue(index: number, update: VringUpdate): void | Promise<void>;
  /**
   * SET_BACKEND_REQ_FD, for a device offering VHOST_USER_PROTOCOL_F_BACKEND_REQ
   * (see VhostUserBackend.setBackendReqFd): the device owns the fd once this
   * returns. Without it the message is refused.
   */
  setBackendReqFd?(fd: number): void | Promise<void>;
  /** Drop device state (memory, features); the rings were stopped first. */
  reset(): void | Promise<void>;
}

/** What the handler knows about one ring between SET_VRING_* messages. */
interface RingState {
  num: number;
  addr: VhostUserVringAddr | null;
  base: number;
  kickFd: number | null;
  callFd: number | null;
  errFd: number | null;
  enabled: boolean;
  /** Running in the device (kick received, not stopped by GET_VRING_BASE). */
  started: boolean;
  /** SET_VRING_BASE arrived since the ring started. */
  baseSet: boolean;
}

function newRing(): RingState {
  return {
    num: 0,
    addr: null,
    base: 0,
    kickFd: null,
    callFd: null,
    errFd: null,
    enabled: false,
    started: false,
    baseSet: false,
  };
}

function closeFd(fd: number | null): void {
  if (fd === null) return;
  try {
    close(fd);
  } catch { /* already closed */ }
}

/** The mapped inflight region (SET_INFLIGHT_FD). */
interface InflightMapping {
  map: MappedRegion;
  numQueues: number;
  queueSize: number;
  regionSize: number;
}

/**
 * Options of a {@link VhostUserHandler}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VhostUserHandlerOptions } from "./handler.ts";
 * const o: VhostUserHandlerOptions = { log: () => {} };
 * assert.equal(typeof o.log, "function");
 * ```
 */
export interface VhostUserHandlerOptions {
  /** Log lines (ring start/stop, inflight region). */
  log?: (line: string) => void;
}

/**
 * The ring state of a vhost-user back-end over a {@link VhostUserDevice}.
 * Give it to `VhostUserServer.listen` as the backend.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VhostUserHandler, type VhostUserDevice } from "./handler.ts";
 * const started: number[] = [];
 * const dev: VhostUserDevice = {
 *   features: () => 1n << 32n, protocolFeatures: () => 0n, numQueues: () => 1,
 *   setFeatures() {}, setProtocolFeatures() {}, getConfig: (_o, n) => new Uint8Array(n),
 *   setConfig() {}, setMemTable() {}, startQueue: (s) => void started.push(s.base),
 *   stopQueue: () => 5, updateQueue() {}, reset() {},
 * };
 * const h = new VhostUserHandler(dev);
 * await h.setVringNum(0, 64);
 * await h.setVringAddr(0, { flags: 0, descUserAddr: 0, availUserAddr: 0x400, usedUserAddr: 0x1000, logGuestAddr: 0 });
 * await h.setVringBase(0, 3);
 * const { eventfd } = await import("../sys/mod.ts");
 * await h.setVringKick(0, eventfd());
 * assert.deepEqual(started, [3]);
 * assert.equal(await h.getVringBase(0), 5);
 * await h.reset();
 * ```
 */
export class VhostUserHandler implements VhostUserBackend {
  readonly device: VhostUserDevice;
  readonly #log: (line: string) => void;
  #rings: RingState[];
  #protocolFeatures = 0n;
  #inflight: InflightMapping | null = null;
  /**
   * Ring operations still running in the device (each settles, never
   * rejects). {@link reset} waits for them: a ring stopped by GET_VRING_BASE
   * has requests in flight that still write its call fd and guest memory.
   */
  readonly #inProgress = new Set<Promise<void>>();
  /** The device's SET_BACKEND_REQ_FD, when it has one (the connection refuses the message otherwise). */
  readonly setBackendReqFd?: (fd: number) => void | Promise<void>;

  constructor(device: VhostUserDevice, opts: VhostUserHandlerOptions = {}) {
    this.device = device;
    this.#log = opts.log ?? (() => {});
    this.#rings = Array.from({ length: device.numQueues() }, newRing);
    if (device.setBackendReqFd) this.setBackendReqFd = (fd) => device.setBackendReqFd!(fd);
  }

  features(): bigint {
    return this.device.features();
  }

  protocolFeatures(): bigint {
    return this.device.protocolFeatures() | featureBit(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD);
  }

  numQueues(): number {
    return this.device.numQueues();
  }

  maxMemSlots(): number {
    return this.device.maxMemSlots?.() ?? 8;
  }

  setFeatures(features: bigint): void | Promise<void> {
    return this.device.setFeatures(features);
  }

  setProtocolFeatures(features: bigint): void | Promise<void> {
    this.#protocolFeatures = features;
    return this.device.setProtocolFeatures(
      features & ~featureBit(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD),
    );
  }

  getConfig(offset: number, size: number): Uint8Array {
    return this.device.getConfig(offset, size);
  }

  setConfig(offset: number, data: Uint8Array, flags: number): void | Promise<void> {
    return this.device.setConfig(offset, data, flags);
  }

  setMemTable(regions: VhostUserMemoryRegion[]): void | Promise<void> {
    const r = this.device.setMemTable(regions);
    return r instanceof Promise ? this.#track(r) : r;
  }

  setVringNum(index: number, num: number): void {
    const max = this.device.maxQueueSize?.() ?? VIRTQUEUE_MAX_SIZE;
    if (num > max) throw new RangeError(`queue ${index}: size ${num} > --queue-size ${max}`);
    this.#rings[index].num = num;
  }

  setVringAddr(index: number, addr: VhostUserVringAddr): void {
    this.#rings[index].addr = addr;
  }

  setVringBase(index: number, base: number): void {
    this.#rings[index].base = base;
    this.#rings[index].baseSet = true;
  }

  getVringBase(index: number): Promise<number> {
    return this.#track(this.#getVringBase(index));
  }

  async #getVringBase(index: number): Promise<number> {
    const r = this.#rings[index];
    if (r.started) {
      r.started = false;
      r.base = await this.device.stopQueue(index);
    }
    // GET_VRING_BASE stops the ring: the kick fd is no longer used.
    closeFd(r.kickFd);
    r.kickFd = null;
    return r.base;
  }

  setVringKick(index: number, fd: number | null): Promise<void> {
    return this.#track(this.#setVringKick(index, fd));
  }

  async #setVringKick(index: number, fd: number | null): Promise<void> {
    const r = this.#rings[index];
    const old = r.kickFd;
    const wasStarted = r.started;
    try {
      if (fd === null) {
        throw new Error(`queue ${index}: polling without a kick fd (NOFD) is not supported`);
      }
      if (r.addr === null || r.num === 0) {
        throw new Error(`queue ${index}: SET_VRING_KICK before SET_VRING_NUM/ADDR`);
      }
      const setup: VringSetup = {
        index,
        num: r.num,
        addr: r.addr,
        // A kick fd replaced while running, with no new SET_VRING_BASE, must
        // not rewind the ring to the old base (that would replay requests).
        base: r.started && !r.baseSet ? -1 : r.base,
        kickFd: fd,
        callFd: r.callFd,
        errFd: r.errFd,
        enabled: r.enabled,
        inflight: this.#ringInflight(index, r.num),
      };
      r.started = false;
      await this.device.startQueue(setup);
    } catch (e) {
      // Refused: nothing changed. A running ring goes on with its old kick
      // fd, which the device still polls: only the refused fd is closed.
      r.started = wasStarted;
      closeFd(fd);
      // Report through the error eventfd too, as a ring that cannot run.
      if (r.errFd !== null) {
        try {
          eventfdWrite(r.errFd, 1);
        } catch { /* a failing err fd must not hide the error being reported */ }
      }
      throw e;
    }
    // The device polls the new fd now: the old one may go.
    r.kickFd = fd;
    r.started = true;
    r.baseSet = false;
    if (old !== null && old !== fd) closeFd(old);
  }

  setVringCall(index: number, fd: number | null): Promise<void> {
    return this.#track(this.#replaceRingFd(index, "callFd", fd));
  }

  setVringErr(index: number, fd: number | null): Promise<void> {
    return this.#track(this.#replaceRingFd(index, "errFd", fd));
  }

  /** Tells a running ring about the new fd first, then closes the old one. */
  async #replaceRingFd(index: number, which: "callFd" | "errFd", fd: number | null): Promise<void> {
    const r = this.#rings[index];
    const old = r[which];
    r[which] = fd;
    if (r.started) await this.device.updateQueue(index, { [which]: fd });
    if (old !== null && old !== fd) closeFd(old);
  }

  setVringEnable(index: number, enabled: boolean): Promise<void> {
    const r = this.#rings[index];
    r.enabled = enabled;
    if (!r.started) return Promise.resolve();
    return this.#track(Promise.resolve(this.device.updateQueue(index, { enabled })));
  }

  // ---- inflight I/O tracking (INFLIGHT_SHMFD) ---------------------------------------

  /**
   * GET_INFLIGHT_FD: a new zeroed region for `numQueues` rings of
   * `queueSize` entries, in a memfd sealed against shrinking. The fd is
   * returned for the reply (the connection closes it after sending); the
   * handler keeps nothing: the front-end hands the region back with
   * SET_INFLIGHT_FD.
   */
  getInflightFd(numQueues: number, queueSize: number): VhostUserInflight {
    if (!this.#inflightNegotiated()) {
      throw new Error("GET_INFLIGHT_FD: INFLIGHT_SHMFD not negotiated");
    }
    if (numQueues < 1 || numQueues > this.numQueues()) {
      throw new RangeError(`GET_INFLIGHT_FD: ${numQueues} queues (device has ${this.numQueues()})`);
    }
    if (queueSize < 1 || queueSize > VIRTQUEUE_MAX_SIZE) {
      throw new RangeError(`GET_INFLIGHT_FD: queue size ${queueSize}`);
    }
    const mmapSize = numQueues * inflightQueueRegionSize(queueSize);
    const fd = memfdCreate("vhost-inflight", MFD_ALLOW_SEALING);
    try {
      ftruncate(fd, mmapSize);
      sealShrink(fd);
    } catch (e) {
      close(fd);
      throw e;
    }
    this.#log(`inflight region: ${numQueues} x ${queueSize} entries, ${mmapSize} bytes`);
    return { fd, mmapSize, mmapOffset: 0, numQueues, queueSize };
  }

  /**
   * SET_INFLIGHT_FD: maps the region the front-end kept (after a restart,
   * the log of the previous back-end process). The handler owns `fd` from
   * the call on. Refused while a ring runs (it uses the current region).
   */
  setInflightFd(inflight: VhostUserInflight): void {
    const { fd, mmapSize, mmapOffset, numQueues, queueSize } = inflight;
    try {
      if (!this.#inflightNegotiated()) {
        throw new Error("SET_INFLIGHT_FD: INFLIGHT_SHMFD not negotiated");
      }
      if (this.#rings.some((r) => r.started)) {
        throw new Error("SET_INFLIGHT_FD while rings are running");
      }
      if (numQueues < 1 || numQueues > this.numQueues()) {
        throw new RangeError(`SET_INFLIGHT_FD: ${numQueues} queues`);
      }
      if (queueSize < 1 || queueSize > VIRTQUEUE_MAX_SIZE) {
        throw new RangeError(`SET_INFLIGHT_FD: queue size ${queueSize}`);
      }
      const regionSize = inflightQueueRegionSize(queueSize);
      if (mmapSize < numQueues * regionSize || mmapSize > 64 * 2 ** 20) {
        throw new RangeError(`SET_INFLIGHT_FD: ${mmapSize} bytes for ${numQueues} x ${queueSize}`);
      }
      if (mmapOffset % 4096 !== 0) {
        throw new RangeError(`SET_INFLIGHT_FD: offset ${mmapOffset} not page-aligned`);
      }
      // As for guest memory: only a regular file that holds the whole range
      // (pages past the end of a shared mapping raise SIGBUS).
      sealShrink(fd);
      const st = fstat(fd);
      if (!st.isRegularFile || mmapOffset + mmapSize > st.size) {
        throw new RangeError(`SET_INFLIGHT_FD: fd is not a file of ${mmapOffset + mmapSize} bytes`);
      }
      const map = mmapShared(fd, mmapSize, mmapOffset);
      this.#inflight?.map.unmap();
      this.#inflight = { map, numQueues, queueSize, regionSize };
      this.#log(`inflight region set: ${numQueues} x ${queueSize} entries`);
    } finally {
      closeFd(fd); // the mapping keeps the memory
    }
  }

  #inflightNegotiated(): boolean {
    return (this.#protocolFeatures & featureBit(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)) !== 0n;
  }

  /** Ring `index`'s part of the inflight region, or null when none is in use. */
  #ringInflight(index: number, num: number): VringInflight | null {
    const m = this.#inflight;
    if (m === null || !this.#inflightNegotiated()) return null;
    if (index >= m.numQueues || num > m.queueSize) {
      throw new RangeError(
        `queue ${index} (size ${num}) is not in the inflight region (${m.numQueues} x ${m.queueSize})`,
      );
    }
    return { addr: m.map.addr + index * m.regionSize, queueSize: m.queueSize };
  }

  /** Remembers `p` until it settles, for {@link reset}. */
  #track<T>(p: Promise<T>): Promise<T> {
    const settled = p.then(() => {}, () => {});
    this.#inProgress.add(settled);
    void settled.then(() => this.#inProgress.delete(settled));
    return p;
  }

  /**
   * Stops every ring (after its in-flight requests), closes ring fds, unmaps
   * the inflight region and resets the device. Ring operations still running
   * are waited for first: a ring stopping (GET_VRING_BASE) or starting
   * (SET_VRING_KICK) when the front-end left is no longer marked started, yet
   * its requests may still complete into its call fd and guest memory.
   */
  async reset(): Promise<void> {
    while (this.#inProgress.size > 0) await Promise.all(this.#inProgress);
    for (let i = 0; i < this.#rings.length; i++) {
      const r = this.#rings[i];
      if (r.started) {
        r.started = false;
        try {
          await this.device.stopQueue(i);
        } catch (e) {
          this.#log(`queue ${i}: stop failed: ${(e as Error).message}`);
        }
      }
      closeFd(r.kickFd);
      closeFd(r.callFd);
      closeFd(r.errFd);
    }
    this.#rings = Array.from({ length: this.numQueues() }, newRing);
    this.#inflight?.map.unmap();
    this.#inflight = null;
    this.#protocolFeatures = 0n;
    await this.device.reset();
  }
}
