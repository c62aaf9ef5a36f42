/**
 * The vhost-user-blk device on the main thread: what the vhost-user
 * connection talks to (`VhostUserBackend`). It answers features and config
 * from the virtio-blk device model, maps guest memory once (SET_MEM_TABLE)
 * and hands the mapping to every IOThread, collects each ring's setup and
 * starts the ring in the IOThread that owns it (queue i goes to IOThread
 * i mod n), and forwards later changes. The data path never touches this
 * thread.
 *
 * @module
 */

import type { IOThread as AioIOThread } from "../aio/mod.ts";
import { close, eventfdWrite } from "../sys/mod.ts";
import {
  DEFAULT_MAX_QUEUE_SIZE,
  encodeVirtioBlkConfig,
  featureBit,
  GuestMemory,
  VIRTIO_BLK_CONFIG,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  virtioBlkFeatures,
  type VirtioBlkOptions,
} from "../virtio/mod.ts";
import {
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_PROTOCOL_F_BACKEND_REQ,
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_MQ,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_PROTOCOL_F_RESET_DEVICE,
  type VhostUserBackend,
  VhostUserBackendChannel,
  type VhostUserMemoryRegion,
  type VhostUserVringAddr,
} from "../vhost_user/mod.ts";
import type { DataPlaneQueueSetup } from "./virtio_blk_dataplane.ts";

/**
 * What the device needs of an IOThread: `call` and `name`. The daemon's exports pass an
 * IOThread scoped to their export (dataplane/daemon/export_thread.ts).
 */
type IOThread = Pick<AioIOThread, "call" | "name">;

/** Protocol features this device offers. */
const PROTOCOL_FEATURES = featureBit(VHOST_USER_PROTOCOL_F_MQ) |
  featureBit(VHOST_USER_PROTOCOL_F_REPLY_ACK) | featureBit(VHOST_USER_PROTOCOL_F_CONFIG) |
  featureBit(VHOST_USER_PROTOCOL_F_RESET_DEVICE) | featureBit(VHOST_USER_PROTOCOL_F_BACKEND_REQ);

/** What the device knows about one ring between SET_VRING_* messages. */
interface RingState {
  num: number;
  addr: VhostUserVringAddr | null;
  base: number;
  kickFd: number | null;
  callFd: number | null;
  errFd: number | null;
  enabled: boolean;
  /** Running in its IOThread (kick received, not stopped by GET_VRING_BASE). */
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

/**
 * Options of a {@link VhostUserBlkDevice}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VhostUserBlkDeviceOptions } from "./vhost_user_blk_device.ts";
 * const o: VhostUserBlkDeviceOptions = { device: { capacity: 2048, numQueues: 1 }, iothreads: [] };
 * assert.equal(o.device.capacity, 2048);
 * ```
 */
export interface VhostUserBlkDeviceOptions {
  /** The virtio-blk device model (also sent to each IOThread by the host). */
  device: VirtioBlkOptions;
  /** IOThreads with the virtio-blk module loaded and configured (blk_iothread.ts). */
  iothreads: IOThread[];
  /** Largest ring the front-end may set up (default 1024, QEMU's VIRTQUEUE_MAX_SIZE). */
  maxQueueSize?: number;
  /** Log lines (ring start/stop, memory, errors). */
  log?: (line: string) => void;
}

/**
 * vhost-user-blk device state on the main thread; a `VhostUserBackend`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VhostUserBlkDevice } from "./vhost_user_blk_device.ts";
 * const dev = new VhostUserBlkDevice({ device: { capacity: 2048, numQueues: 2 }, iothreads: [] });
 * assert.equal(dev.numQueues(), 2);
 * assert.equal(dev.getConfig(0, 8)[1], 8); // capacity 2048 = 0x800, little-endian
 * ```
 */
export class VhostUserBlkDevice implements VhostUserBackend {
  readonly #device: VirtioBlkOptions;
  readonly #threads: IOThread[];
  readonly #log: (line: string) => void;
  readonly #maxQueueSize: number;
  readonly #config: Uint8Array;
  #protocolFeatures = 0n;
  #backendChannel: VhostUserBackendChannel | null = null;
  readonly #features: bigint;
  #acked = 0n;
  #mem: GuestMemory | null = null;
  #rings: RingState[];
  /**
   * Operations still running in an IOThread (each settles, never rejects).
   * {@link reset} waits for them: a ring stopped by GET_VRING_BASE has
   * requests in flight that still write its call fd and guest memory.
   */
  readonly #inProgress = new Set<Promise<void>>();

  constructor(opts: VhostUserBlkDeviceOptions) {
    this.#device = opts.device;
    this.#threads = opts.iothreads;
    this.#log = opts.log ?? (() => {});
    this.#maxQueueSize = opts.maxQueueSize ?? DEFAULT_MAX_QUEUE_SIZE;
    this.#config = encodeVirtioBlkConfig(opts.device);
    this.#features = virtioBlkFeatures(opts.device) | featureBit(VHOST_USER_F_PROTOCOL_FEATURES);
    this.#rings = Array.from({ length: this.numQueues() }, newRing);
  }

  /** The IOThread serving queue `index`. */
  threadOf(index: number): IOThread {
    return this.#threads[index % this.#threads.length];
  }

  features(): bigint {
    return this.#features;
  }

  protocolFeatures(): bigint {
    return PROTOCOL_FEATURES;
  }

  numQueues(): number {
    return this.#device.numQueues ?? 1;
  }

  setFeatures(features: bigint): void {
    this.#acked = features;
  }

  setProtocolFeatures(features: bigint): void {
    this.#protocolFeatures = features;
  }

  /** SET_BACKEND_REQ_FD: the channel config-change messages go out on. */
  setBackendReqFd(fd: number): void {
    if ((this.#protocolFeatures & featureBit(VHOST_USER_PROTOCOL_F_BACKEND_REQ)) === 0n) {
      throw new Error("SET_BACKEND_REQ_FD without VHOST_USER_PROTOCOL_F_BACKEND_REQ negotiated");
    }
    const replyAck = (this.#protocolFeatures & featureBit(VHOST_USER_PROTOCOL_F_REPLY_ACK)) !== 0n;
    const next = VhostUserBackendChannel.adopt(fd, replyAck);
    this.#backendChannel?.close();
    this.#backendChannel = next;
  }

  /**
   * Tells the front-end the config changed (the capacity, after a resize):
   * VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the back-end channel. Resolves
   * with what became of it ("none" without a channel).
   */
  notifyConfigChange(): Promise<string> {
    return this.#backendChannel?.configChanged() ?? Promise.resolve("none");
  }

  getConfig(offset: number, size: number): Uint8Array {
    const out = new Uint8Array(size);
    if (offset < this.#config.length) {
      out.set(this.#config.subarray(offset, Math.min(offset + size, this.#config.length)));
    }
    return out;
  }

  /**
   * The capacity GET_CONFIG reports from now on (512-byte sectors), after
   * the image was resized (QMP block_resize).
   */
  setCapacity(sectors: number): void {
    new DataView(this.#config.buffer, this.#config.byteOffset).setBigUint64(
      VIRTIO_BLK_CONFIG.capacity,
      BigInt(sectors),
      true,
    );
  }

  /** Only the `writeback` byte is writable (CONFIG_WCE), as in QEMU's virtio_blk_set_config. */
  async setConfig(offset: number, data: Uint8Array, _flags: number): Promise<void> {
    const wb = VIRTIO_BLK_CONFIG.writeback;
    if (this.#device.writeback === undefined || offset > wb || offset + data.length <= wb) {
      throw new Error(`config write of ${data.length} bytes at ${offset}: read-only field`);
    }
    const on = data[wb - offset] !== 0;
    this.#config[wb] = on ? 1 : 0;
    for (const t of this.#threads) await t.call("blkSetWriteback", { on });
    this.#log(`write cache ${on ? "enabled" : "disabled (writethrough)"} by the guest`);
  }

  setMemTable(regions: VhostUserMemoryRegion[]): Promise<void> {
    return this.#track(this.#setMemTable(regions));
  }

  async #setMemTable(regions: VhostUserMemoryRegion[]): Promise<void> {
    const next = GuestMemory.map(regions);
    const moved: IOThread[] = [];
    try {
      for (const t of this.#threads) {
        await t.call("blkSetMemory", { regions: next.regions() });
        moved.push(t);
      }
    } catch (e) {
      // All or nothing. A thread refuses a table that does not hold one of
      // its running rings and changes nothing; the threads that took it go
      // back to the old table (their rings ran on it), so every ring goes on
      // where it was. Dropping memory instead lost the IOThreads' queues
      // while the rings stayed started: the next SET_VRING_KICK restarted
      // them from 0 and replayed answered requests.
      try {
        const old = this.#mem?.regions() ?? null;
        for (const t of moved) await t.call("blkSetMemory", { regions: old });
      } catch (e2) {
        this.#log(`memory: cannot restore the previous table: ${(e2 as Error).message}`);
        await this.#dropMemory();
      }
      next.close();
      throw e;
    }
    this.#mem?.close();
    this.#mem = next;
    const mib = regions.reduce((s, r) => s + r.size, 0) / 2 ** 20;
    this.#log(`memory: ${regions.length} region(s), ${mib.toFixed(0)} MiB`);
    if (next.unsealedRegions > 0) {
      this.#log(
        `warning: ${next.unsealedRegions} memory region(s) cannot be sealed against shrinking: ` +
          `a front-end that truncates them would crash this process (SIGBUS)`,
      );
    }
  }

  setVringNum(index: number, num: number): void {
    if (num > this.#maxQueueSize) {
      throw new RangeError(`queue ${index}: size ${num} > --queue-size ${this.#maxQueueSize}`);
    }
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
      r.base = await this.threadOf(index).call<number>("blkStopQueue", { index });
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
      // The connection handed over only an eventfd made non-blocking (a
      // blocking one that something else drains would hang the IOThread).
      if (r.addr === null || r.num === 0) {
        throw new Error(`queue ${index}: SET_VRING_KICK before SET_VRING_NUM/ADDR`);
      }
      if (this.#mem === null) {
        throw new Error(`queue ${index}: SET_VRING_KICK before SET_MEM_TABLE`);
      }
      const setup: DataPlaneQueueSetup = {
        index,
        size: r.num,
        desc: r.addr.descUserAddr,
        avail: r.addr.availUserAddr,
        used: r.addr.usedUserAddr,
        // A kick fd replaced while running, with no new SET_VRING_BASE, must
        // not rewind the ring to the old base (that would replay requests).
        base: r.started && !r.baseSet ? -1 : r.base,
        kickFd: fd,
        callFd: r.callFd,
        errFd: r.errFd,
        eventIdx: (this.#acked & featureBit(VIRTIO_RING_F_EVENT_IDX)) !== 0n,
        indirectDesc: (this.#acked & featureBit(VIRTIO_RING_F_INDIRECT_DESC)) !== 0n,
        enabled: r.enabled,
      };
      r.started = false;
      await this.threadOf(index).call("blkStartQueue", setup);
    } catch (e) {
      // Refused: nothing changed. A running ring goes on with its old kick
      // fd, which its IOThread still polls (blkStartQueue restores a queue
      // whose restart it refuses): only the refused fd is closed.
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
    // The IOThread polls the new fd now: the old one may go.
    r.kickFd = fd;
    r.started = true;
    r.baseSet = false;
    if (old !== null && old !== fd) closeFd(old);
    this.#log(
      `queue ${index}: started on ${this.threadOf(index).name} (size ${r.num}, base ${r.base}${
        r.enabled ? "" : ", disabled"
      })`,
    );
  }

  setVringCall(index: number, fd: number | null): Promise<void> {
    return this.#track(this.#replaceRingFd(index, "callFd", fd));
  }

  setVringErr(index: number, fd: number | null): Promise<void> {
    return this.#track(this.#replaceRingFd(index, "errFd", fd));
  }

  /** Tells a running ring's IOThread about the new fd first, then closes the old one. */
  async #replaceRingFd(index: number, which: "callFd" | "errFd", fd: number | null): Promise<void> {
    const r = this.#rings[index];
    const old = r[which];
    r[which] = fd;
    if (r.started) await this.threadOf(index).call("blkSetVring", { index, [which]: fd });
    if (old !== null && old !== fd) closeFd(old);
  }

  setVringEnable(index: number, enabled: boolean): Promise<void> {
    const r = this.#rings[index];
    r.enabled = enabled;
    if (!r.started) return Promise.resolve();
    return this.#track(this.threadOf(index).call("blkSetVring", { index, enabled }));
  }

  /**
   * Stops every running ring where it is (its base kept for the next
   * SET_VRING_KICK), then gives every thread no memory and unmaps it.
   */
  async #dropMemory(): Promise<void> {
    for (let i = 0; i < this.#rings.length; i++) {
      const r = this.#rings[i];
      if (!r.started) continue;
      r.started = false;
      try {
        r.base = await this.threadOf(i).call<number>("blkStopQueue", { index: i });
      } catch (e) {
        this.#log(`queue ${i}: stop failed: ${(e as Error).message}`);
      }
    }
    for (const t of this.#threads) {
      await t.call("blkSetMemory", { regions: null }).catch(() => {});
    }
    this.#mem?.close();
    this.#mem = null;
  }

  /** Remembers `p` until it settles, for {@link reset}. */
  #track<T>(p: Promise<T>): Promise<T> {
    const settled = p.then(() => {}, () => {});
    this.#inProgress.add(settled);
    void settled.then(() => this.#inProgress.delete(settled));
    return p;
  }

  /**
   * Stops every ring (after its in-flight requests), unmaps memory, closes
   * fds. Operations still running are waited for first: a ring stopping
   * (GET_VRING_BASE) or starting (SET_VRING_KICK) when the front-end left
   * is no longer marked started, yet its IOThread may still complete
   * requests into its call fd and guest memory, or poll its kick fd.
   */
  async reset(): Promise<void> {
    this.#backendChannel?.close(); // the channel belongs to the front-end's session
    this.#backendChannel = null;
    while (this.#inProgress.size > 0) await Promise.all(this.#inProgress);
    for (let i = 0; i < this.#rings.length; i++) {
      const r = this.#rings[i];
      if (r.started) {
        r.started = false;
        await this.threadOf(i).call("blkStopQueue", { index: i }).catch((e) =>
          this.#log(`queue ${i}: stop failed: ${(e as Error).message}`)
        );
      }
      closeFd(r.kickFd);
      closeFd(r.callFd);
      closeFd(r.errFd);
    }
    this.#rings = Array.from({ length: this.numQueues() }, newRing);
    if (this.#mem !== null) {
      for (const t of this.#threads) {
        await t.call("blkSetMemory", { regions: null }).catch(() => {});
      }
      this.#mem.close();
      this.#mem = null;
    }
    this.#acked = 0n;
  }
}
