/**
 * The vhost-user-blk device on the main thread, a `VhostUserDevice` under the
 * vhost-user layer's `VhostUserHandler` (which owns the ring state and the
 * ring fds). It answers features and config from the virtio-blk device
 * model, maps guest memory once (SET_MEM_TABLE) and hands the mapping to
 * every IOThread, starts a ring in the IOThread that owns it (queue i goes to
 * IOThread i mod n), stops it, and forwards later changes. The data path
 * never touches this thread.
 *
 * @module
 */

import type { IOThread as AioIOThread } from "../aio/mod.ts";
import {
  configWriteback,
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
  VhostUserBackendChannel,
  type VhostUserDevice,
  type VhostUserMemoryRegion,
  type VringSetup,
  type VringUpdate,
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
 * vhost-user-blk device state on the main thread; a `VhostUserDevice`.
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
export class VhostUserBlkDevice implements VhostUserDevice {
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
  /** Queues running in their IOThread. */
  readonly #running = new Set<number>();
  /** Where each queue stopped last (blkStopQueue), for a restart that keeps its position. */
  readonly #stoppedAt = new Map<number, number>();

  constructor(opts: VhostUserBlkDeviceOptions) {
    this.#device = opts.device;
    this.#threads = opts.iothreads;
    this.#log = opts.log ?? (() => {});
    this.#maxQueueSize = opts.maxQueueSize ?? DEFAULT_MAX_QUEUE_SIZE;
    this.#config = encodeVirtioBlkConfig(opts.device);
    this.#features = virtioBlkFeatures(opts.device) | featureBit(VHOST_USER_F_PROTOCOL_FEATURES);
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

  maxQueueSize(): number {
    return this.#maxQueueSize;
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
    const on = configWriteback(this.#device, offset, data);
    this.#config[VIRTIO_BLK_CONFIG.writeback] = on ? 1 : 0;
    for (const t of this.#threads) await t.call("blkSetWriteback", { on });
    this.#log(`write cache ${on ? "enabled" : "disabled (writethrough)"} by the guest`);
  }

  async setMemTable(regions: VhostUserMemoryRegion[]): Promise<void> {
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

  /**
   * Starts (or restarts, with a new kick fd) a ring in its IOThread. A
   * refused restart leaves the ring running as before.
   */
  async startQueue(s: VringSetup): Promise<void> {
    if (this.#mem === null) {
      throw new Error(`queue ${s.index}: SET_VRING_KICK before SET_MEM_TABLE`);
    }
    // -1 (keep the position) for a ring this device stopped by itself
    // (memory lost) means where it stopped.
    const base = s.base < 0 && !this.#running.has(s.index)
      ? (this.#stoppedAt.get(s.index) ?? 0)
      : s.base;
    const setup: DataPlaneQueueSetup = {
      index: s.index,
      size: s.num,
      desc: s.addr.descUserAddr,
      avail: s.addr.availUserAddr,
      used: s.addr.usedUserAddr,
      base,
      kickFd: s.kickFd,
      callFd: s.callFd,
      errFd: s.errFd,
      eventIdx: (this.#acked & featureBit(VIRTIO_RING_F_EVENT_IDX)) !== 0n,
      indirectDesc: (this.#acked & featureBit(VIRTIO_RING_F_INDIRECT_DESC)) !== 0n,
      enabled: s.enabled,
      inflight: s.inflight,
    };
    const wasRunning = this.#running.delete(s.index);
    let resubmitted: number;
    try {
      resubmitted = await this.threadOf(s.index).call<number>("blkStartQueue", setup);
    } catch (e) {
      if (wasRunning) this.#running.add(s.index);
      throw e;
    }
    this.#running.add(s.index);
    this.#log(
      `queue ${s.index}: started on ${this.threadOf(s.index).name} (size ${s.num}, base ${
        base < 0 ? "kept" : base
      }${s.enabled ? "" : ", disabled"}${
        s.inflight ? `, inflight tracking: ${resubmitted} request(s) resubmitted` : ""
      })`,
    );
  }

  /** Stops a ring after its in-flight requests (GET_VRING_BASE); the next avail index. */
  async stopQueue(index: number): Promise<number> {
    if (!this.#running.delete(index)) return this.#stoppedAt.get(index) ?? 0;
    const base = await this.threadOf(index).call<number>("blkStopQueue", { index });
    this.#stoppedAt.set(index, base);
    return base;
  }

  /** SET_VRING_CALL / SET_VRING_ERR / SET_VRING_ENABLE on a running ring. */
  async updateQueue(index: number, update: VringUpdate): Promise<void> {
    if (!this.#running.has(index)) return;
    await this.threadOf(index).call("blkSetVring", { index, ...update });
  }

  /**
   * Stops every running ring where it is (its base kept for the next
   * SET_VRING_KICK), then gives every thread no memory and unmaps it.
   */
  async #dropMemory(): Promise<void> {
    for (const i of [...this.#running]) {
      try {
        await this.stopQueue(i);
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

  /**
   * Drops the device state: guest memory (after the handler stopped the
   * rings; any ring still running is stopped first) and features.
   */
  async reset(): Promise<void> {
    this.#backendChannel?.close(); // the channel belongs to the front-end's session
    this.#backendChannel = null;
    if (this.#mem !== null || this.#running.size > 0) await this.#dropMemory();
    this.#stoppedAt.clear();
    this.#acked = 0n;
  }
}
