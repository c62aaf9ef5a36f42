/**
 * The virtio-blk device behind the virtio-mmio transport: a
 * {@link VirtioMmioBackend} whose queues run in the same IOThreads, with the
 * same VirtioBlkDataPlane, as the vhost-user-blk host's (dataplane/
 * blk_iothread.ts, driven through IOThread.call exactly as
 * VhostUserBlkDevice drives it). Queue i runs in IOThread i mod n; its kick
 * fd is the eventfd KVM_IOEVENTFD signals when the guest writes i to
 * QueueNotify, its call fd the eventfd KVM_IRQFD turns into the device's
 * interrupt: no thread of this process sees either on the data path.
 *
 * @module
 */

import type { IOThread } from "../aio/mod.ts";
import { eventfdWrite } from "../sys/mod.ts";
import {
  configWriteback,
  encodeVirtioBlkConfig,
  featureBit,
  VIRTIO_BLK_CONFIG,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  virtioBlkFeatures,
  type VirtioBlkOptions,
} from "../virtio/mod.ts";
import type { DataPlaneQueueSetup } from "../dataplane/mod.ts";
import type { VirtioMmioBackend, VirtioMmioQueue } from "./virtio_mmio.ts";

/** virtio device ID of a block device (virtio 1.2, 5). */
export const VIRTIO_ID_BLOCK = 2;

/**
 * Options of a {@link VirtioMmioBlk}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VirtioMmioBlkOptions } from "./virtio_mmio_blk.ts";
 * const o: VirtioMmioBlkOptions = { device: { capacity: 8 }, iothreads: [], kickFds: [7], callFd: 8, queueNumMax: 256 };
 * assert.equal(o.kickFds.length, 1);
 * ```
 */
export interface VirtioMmioBlkOptions {
  device: VirtioBlkOptions;
  /** IOThreads with blk_iothread.ts loaded, the image open and the dataplane configured. */
  iothreads: IOThread[];
  /** One kick eventfd per queue (the KVM_IOEVENTFD of its QueueNotify value). */
  kickFds: number[];
  /** The call eventfd of every queue (the device's KVM_IRQFD). */
  callFd: number;
  queueNumMax: number;
  log?: (line: string) => void;
}

/**
 * virtio-blk queues in IOThreads, for the virtio-mmio transport.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VirtioMmioBlk } from "./virtio_mmio_blk.ts";
 * const b = new VirtioMmioBlk({ device: { capacity: 2048, numQueues: 2 }, iothreads: [], kickFds: [5, 6], callFd: 7, queueNumMax: 256 });
 * assert.equal(b.numQueues, 2);
 * assert.equal(b.config()[1], 8); // capacity 2048 = 0x800
 * ```
 */
export class VirtioMmioBlk implements VirtioMmioBackend {
  readonly deviceId = VIRTIO_ID_BLOCK;
  readonly deviceFeatures: bigint;
  readonly numQueues: number;
  readonly queueNumMax: number;
  readonly #o: VirtioMmioBlkOptions;
  readonly #config: Uint8Array;

  constructor(opts: VirtioMmioBlkOptions) {
    this.#o = opts;
    this.deviceFeatures = virtioBlkFeatures(opts.device);
    this.numQueues = opts.device.numQueues ?? 1;
    this.queueNumMax = opts.queueNumMax;
    this.#config = encodeVirtioBlkConfig(opts.device);
    if (opts.kickFds.length !== this.numQueues) {
      throw new RangeError(`${opts.kickFds.length} kick fds for ${this.numQueues} queues`);
    }
  }

  #thread(index: number): IOThread {
    return this.#o.iothreads[index % this.#o.iothreads.length];
  }

  config(): Uint8Array {
    return this.#config;
  }

  /** Only the `writeback` byte is writable (CONFIG_WCE), as in QEMU's virtio_blk_set_config. */
  async writeConfig(offset: number, data: Uint8Array): Promise<void> {
    const on = configWriteback(this.#o.device, offset, data);
    this.#config[VIRTIO_BLK_CONFIG.writeback] = on ? 1 : 0;
    for (const t of this.#o.iothreads) await t.call("blkSetWriteback", { on });
    this.#o.log?.(`write cache ${on ? "enabled" : "disabled (writethrough)"} by the guest`);
  }

  async startQueue(q: VirtioMmioQueue, features: bigint): Promise<void> {
    const setup: DataPlaneQueueSetup = {
      index: q.index,
      size: q.size,
      desc: q.desc,
      avail: q.driver,
      used: q.device,
      base: 0,
      kickFd: this.#o.kickFds[q.index],
      callFd: this.#o.callFd,
      errFd: null,
      eventIdx: (features & featureBit(VIRTIO_RING_F_EVENT_IDX)) !== 0n,
      indirectDesc: (features & featureBit(VIRTIO_RING_F_INDIRECT_DESC)) !== 0n,
      enabled: true,
    };
    await this.#thread(q.index).call("blkStartQueue", setup);
  }

  async stopQueue(index: number): Promise<void> {
    await this.#thread(index).call<number>("blkStopQueue", { index });
  }

  /** A QueueNotify that reached user space (notify trapped, no ioeventfd): kick the queue. */
  notify(index: number): void {
    eventfdWrite(this.#o.kickFds[index], 1);
  }
}
