/**
 * The virtio-mmio transport (virtio 1.2 section 4.2), version 2 (modern)
 * only: the register file a guest driver sees at the device's MMIO window,
 * with feature negotiation, queue setup, device status, config space,
 * interrupt status/acknowledge and reset. What the device does with a ready
 * queue is behind {@link VirtioMmioBackend} (vm/virtio_mmio_blk.ts starts it
 * in an IOThread's dataplane); this file only keeps the transport's state
 * and refuses what a driver may not do.
 *
 * The guest is untrusted. A write out of order (queue registers before
 * FEATURES_OK or on a ready queue, features after FEATURES_OK, a status bit
 * cleared other than by reset), a bad queue size or misaligned ring, a notify
 * for a queue that is not running, a register access of the wrong width:
 * the write is ignored (logged, a bounded number of times). A device that
 * cannot go on (a ring outside RAM at DRIVER_OK, a ring that broke in its
 * IOThread, DRIVER_OK without FEATURES_OK) sets DEVICE_NEEDS_RESET and
 * raises a configuration-change interrupt (4.2.2: "the device MUST ... set
 * DEVICE_NEEDS_RESET") until the driver resets it. Nothing the guest does
 * throws out of {@link VirtioMmioDevice.read} or {@link VirtioMmioDevice.write}.
 *
 * @module
 */

import { featureBit, VIRTIO_F_VERSION_1, VIRTQUEUE_MAX_SIZE } from "../virtio/mod.ts";

/** Register offsets (virtio 1.2, 4.2.2, table "MMIO Device Register Layout"). */
export const VIRTIO_MMIO = {
  MAGIC_VALUE: 0x000,
  VERSION: 0x004,
  DEVICE_ID: 0x008,
  VENDOR_ID: 0x00c,
  DEVICE_FEATURES: 0x010,
  DEVICE_FEATURES_SEL: 0x014,
  DRIVER_FEATURES: 0x020,
  DRIVER_FEATURES_SEL: 0x024,
  QUEUE_SEL: 0x030,
  QUEUE_NUM_MAX: 0x034,
  QUEUE_NUM: 0x038,
  QUEUE_READY: 0x044,
  QUEUE_NOTIFY: 0x050,
  INTERRUPT_STATUS: 0x060,
  INTERRUPT_ACK: 0x064,
  STATUS: 0x070,
  QUEUE_DESC_LOW: 0x080,
  QUEUE_DESC_HIGH: 0x084,
  QUEUE_DRIVER_LOW: 0x090,
  QUEUE_DRIVER_HIGH: 0x094,
  QUEUE_DEVICE_LOW: 0x0a0,
  QUEUE_DEVICE_HIGH: 0x0a4,
  SHM_SEL: 0x0ac,
  SHM_LEN_LOW: 0x0b0,
  SHM_LEN_HIGH: 0x0b4,
  SHM_BASE_LOW: 0x0b8,
  SHM_BASE_HIGH: 0x0bc,
  CONFIG_GENERATION: 0x0fc,
  CONFIG: 0x100,
} as const;

/** "virt" little-endian (4.2.2 MagicValue). */
export const VIRTIO_MMIO_MAGIC = 0x74726976;
/** The modern register layout (4.2.2 Version; 1 is legacy, not offered). */
export const VIRTIO_MMIO_VERSION = 2;
/** Bytes of the MMIO window: registers, then up to 0x100 bytes of config space. */
export const VIRTIO_MMIO_SIZE = 0x200;
/** VendorID this device reports (any value is allowed; this one spells "dpln"). */
export const VIRTIO_MMIO_VENDOR = 0x6e6c7064;

/** Device status bits (virtio 1.2, 2.1). */
export const VIRTIO_CONFIG_S_ACKNOWLEDGE = 1;
export const VIRTIO_CONFIG_S_DRIVER = 2;
export const VIRTIO_CONFIG_S_DRIVER_OK = 4;
export const VIRTIO_CONFIG_S_FEATURES_OK = 8;
export const VIRTIO_CONFIG_S_NEEDS_RESET = 0x40;
export const VIRTIO_CONFIG_S_FAILED = 0x80;

/** InterruptStatus bits (4.2.2): a used buffer; a configuration change. */
export const VIRTIO_MMIO_INT_VRING = 1;
export const VIRTIO_MMIO_INT_CONFIG = 2;

/**
 * One queue as the driver configured it (guest-physical addresses).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VirtioMmioQueue } from "./virtio_mmio.ts";
 * const q: VirtioMmioQueue = { index: 0, size: 128, desc: 0x10000, driver: 0x10800, device: 0x11000 };
 * assert.equal(q.size, 128);
 * ```
 */
export interface VirtioMmioQueue {
  index: number;
  size: number;
  /** Descriptor table, driver area (available ring), device area (used ring). */
  desc: number;
  driver: number;
  device: number;
}

/**
 * What the transport needs from the device behind it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VirtioMmioBackend } from "./virtio_mmio.ts";
 * const b: VirtioMmioBackend = {
 *   deviceId: 2, deviceFeatures: 1n << 32n, numQueues: 1, queueNumMax: 256,
 *   config: () => new Uint8Array(8), writeConfig() {},
 *   startQueue: () => Promise.resolve(), stopQueue: () => Promise.resolve(),
 * };
 * assert.equal(b.deviceId, 2);
 * ```
 */
export interface VirtioMmioBackend {
  /** Virtio device ID (2: block). */
  readonly deviceId: number;
  /** Features offered (must include VIRTIO_F_VERSION_1). */
  readonly deviceFeatures: bigint;
  readonly numQueues: number;
  /** QueueNumMax of every queue. */
  readonly queueNumMax: number;
  /** The device-specific configuration space as it is now. */
  config(): Uint8Array;
  /** A driver write to config space; throwing refuses it (read-only field). */
  writeConfig(offset: number, data: Uint8Array): void | Promise<void>;
  /** Starts serving a queue (DRIVER_OK); throwing puts the device in NEEDS_RESET. */
  startQueue(q: VirtioMmioQueue, features: bigint): Promise<void>;
  /** Stops a queue after its requests in flight (reset). */
  stopQueue(index: number): Promise<void>;
  /**
   * A QueueNotify write that reached user space (no ioeventfd took it): kick
   * a running queue. Optional: with an ioeventfd per queue it is not needed.
   */
  notify?(index: number): void;
}

/**
 * Options of a {@link VirtioMmioDevice}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VirtioMmioDeviceOptions } from "./virtio_mmio.ts";
 * const o: VirtioMmioDeviceOptions = { isr: new Int32Array(new SharedArrayBuffer(4)), raiseIrq() {} };
 * assert.equal(o.isr[0], 0);
 * ```
 */
export interface VirtioMmioDeviceOptions {
  /** The interrupt status word, shared with the IOThreads (which set bit 0) and the vCPU thread. */
  isr: Int32Array;
  /** Raises the device's interrupt line (a configuration-change interrupt). */
  raiseIrq(): void;
  log?: (line: string) => void;
  /** Guest errors logged before the rest are only counted (default 20). */
  maxLoggedErrors?: number;
}

interface QueueState {
  num: number;
  ready: boolean;
  started: boolean;
  desc: [number, number];
  driver: [number, number];
  device: [number, number];
}

function newQueue(): QueueState {
  return { num: 0, ready: false, started: false, desc: [0, 0], driver: [0, 0], device: [0, 0] };
}

function addr(halves: [number, number]): number {
  return halves[1] * 2 ** 32 + halves[0];
}

/**
 * The virtio-mmio register file of one device.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VIRTIO_MMIO, VIRTIO_MMIO_MAGIC, VirtioMmioDevice } from "./virtio_mmio.ts";
 * const dev = new VirtioMmioDevice({
 *   deviceId: 2, deviceFeatures: 1n << 32n, numQueues: 1, queueNumMax: 256,
 *   config: () => new Uint8Array([1, 2, 3, 4]), writeConfig() {},
 *   startQueue: () => Promise.resolve(), stopQueue: () => Promise.resolve(),
 * }, { isr: new Int32Array(new SharedArrayBuffer(4)), raiseIrq() {} });
 * assert.equal(await dev.read(VIRTIO_MMIO.MAGIC_VALUE, 4), BigInt(VIRTIO_MMIO_MAGIC));
 * assert.equal(await dev.read(VIRTIO_MMIO.CONFIG + 1, 2), 0x0302n);
 * ```
 */
export class VirtioMmioDevice {
  readonly #b: VirtioMmioBackend;
  readonly #isr: Int32Array;
  readonly #raiseIrq: () => void;
  readonly #log: (line: string) => void;
  readonly #maxLogged: number;
  #status = 0;
  #deviceFeaturesSel = 0;
  #driverFeaturesSel = 0;
  #driverFeatures = 0n;
  #queueSel = 0;
  #queues: QueueState[];
  #generation = 0;
  #guestErrors = 0;

  constructor(backend: VirtioMmioBackend, opts: VirtioMmioDeviceOptions) {
    this.#b = backend;
    this.#isr = opts.isr;
    this.#raiseIrq = opts.raiseIrq;
    this.#log = opts.log ?? (() => {});
    this.#maxLogged = opts.maxLoggedErrors ?? 20;
    this.#queues = Array.from({ length: backend.numQueues }, newQueue);
  }

  /** The device status byte. */
  get status(): number {
    return this.#status;
  }

  /** Features the driver accepted (valid once FEATURES_OK is set). */
  get driverFeatures(): bigint {
    return this.#driverFeatures;
  }

  /** Guest errors seen (ignored writes, bad accesses). */
  get guestErrors(): number {
    return this.#guestErrors;
  }

  /** Whether queue `index` runs in its backend. */
  queueStarted(index: number): boolean {
    return this.#queues[index]?.started ?? false;
  }

  #guestError(what: string): void {
    this.#guestErrors++;
    if (this.#guestErrors <= this.#maxLogged) this.#log(`virtio-mmio: guest error: ${what}`);
    else if (this.#guestErrors === this.#maxLogged + 1) {
      this.#log("virtio-mmio: further guest errors are counted, not logged");
    }
  }

  get #selected(): QueueState | null {
    return this.#queues[this.#queueSel] ?? null;
  }

  /**
   * A guest read of `size` bytes at `offset` in the window. Registers are
   * 32-bit (4.2.2: "the driver MUST use only 32 bit wide and aligned reads");
   * anything else reads 0. Config space takes any width: bytes past its
   * end read 0.
   */
  read(offset: number, size: number): bigint {
    if (offset >= VIRTIO_MMIO.CONFIG) return this.#readConfig(offset - VIRTIO_MMIO.CONFIG, size);
    if (size !== 4 || offset % 4 !== 0) {
      this.#guestError(`register read of ${size} bytes at ${hex(offset)}`);
      return 0n;
    }
    return BigInt(this.#readRegister(offset) >>> 0);
  }

  #readRegister(offset: number): number {
    const M = VIRTIO_MMIO;
    const q = this.#selected;
    switch (offset) {
      case M.MAGIC_VALUE:
        return VIRTIO_MMIO_MAGIC;
      case M.VERSION:
        return VIRTIO_MMIO_VERSION;
      case M.DEVICE_ID:
        return this.#b.deviceId;
      case M.VENDOR_ID:
        return VIRTIO_MMIO_VENDOR;
      case M.DEVICE_FEATURES:
        return this.#deviceFeaturesSel > 1
          ? 0
          : Number((this.#b.deviceFeatures >> BigInt(32 * this.#deviceFeaturesSel)) & 0xffffffffn);
      case M.QUEUE_NUM_MAX:
        return q === null ? 0 : this.#b.queueNumMax;
      case M.QUEUE_NUM:
        return q?.num ?? 0;
      case M.QUEUE_READY:
        return q?.ready ? 1 : 0;
      case M.INTERRUPT_STATUS:
        return Atomics.load(this.#isr, 0);
      case M.STATUS:
        return this.#status;
      case M.QUEUE_DESC_LOW:
        return q?.desc[0] ?? 0;
      case M.QUEUE_DESC_HIGH:
        return q?.desc[1] ?? 0;
      case M.QUEUE_DRIVER_LOW:
        return q?.driver[0] ?? 0;
      case M.QUEUE_DRIVER_HIGH:
        return q?.driver[1] ?? 0;
      case M.QUEUE_DEVICE_LOW:
        return q?.device[0] ?? 0;
      case M.QUEUE_DEVICE_HIGH:
        return q?.device[1] ?? 0;
      case M.SHM_LEN_LOW:
      case M.SHM_LEN_HIGH:
        return 0xffffffff; // 4.2.2: no shared memory region
      case M.CONFIG_GENERATION:
        return this.#generation;
      default:
        return 0;
    }
  }

  #readConfig(at: number, size: number): bigint {
    const cfg = this.#b.config();
    let v = 0n;
    for (let i = Math.min(size, 8) - 1; i >= 0; i--) {
      const b = at + i < cfg.length ? cfg[at + i] : 0;
      v = (v << 8n) | BigInt(b);
    }
    return v;
  }

  /**
   * A guest write of `size` bytes of `value` at `offset`. Resolves once it
   * took effect (a queue started or stopped, a reset done).
   */
  async write(offset: number, size: number, value: bigint): Promise<void> {
    if (offset >= VIRTIO_MMIO.CONFIG) {
      const n = Math.min(size, 8);
      const data = new Uint8Array(n);
      for (let i = 0; i < n; i++) data[i] = Number((value >> BigInt(8 * i)) & 0xffn);
      try {
        await this.#b.writeConfig(offset - VIRTIO_MMIO.CONFIG, data);
        this.#generation = (this.#generation + 1) >>> 0;
      } catch (e) {
        this.#guestError(`config write at ${offset - VIRTIO_MMIO.CONFIG}: ${(e as Error).message}`);
      }
      return;
    }
    if (size !== 4 || offset % 4 !== 0) {
      this.#guestError(`register write of ${size} bytes at ${hex(offset)}`);
      return;
    }
    await this.#writeRegister(offset, Number(value & 0xffffffffn));
  }

  async #writeRegister(offset: number, v: number): Promise<void> {
    const M = VIRTIO_MMIO;
    switch (offset) {
      case M.DEVICE_FEATURES_SEL:
        this.#deviceFeaturesSel = v;
        return;
      case M.DRIVER_FEATURES_SEL:
        this.#driverFeaturesSel = v;
        return;
      case M.DRIVER_FEATURES:
        return this.#writeDriverFeatures(v);
      case M.QUEUE_SEL:
        this.#queueSel = v;
        return;
      case M.QUEUE_NUM:
      case M.QUEUE_DESC_LOW:
      case M.QUEUE_DESC_HIGH:
      case M.QUEUE_DRIVER_LOW:
      case M.QUEUE_DRIVER_HIGH:
      case M.QUEUE_DEVICE_LOW:
      case M.QUEUE_DEVICE_HIGH:
        return this.#writeQueueField(offset, v);
      case M.QUEUE_READY:
        return await this.#writeQueueReady(v);
      case M.QUEUE_NOTIFY:
        return this.#notify(v);
      case M.INTERRUPT_ACK:
        Atomics.and(this.#isr, 0, ~v);
        return;
      case M.STATUS:
        return await this.#writeStatus(v & 0xff);
      case M.SHM_SEL:
        return;
      default:
        this.#guestError(`write to read-only or unknown register ${hex(offset)}`);
    }
  }

  #writeDriverFeatures(v: number): void {
    const s = this.#status;
    if (
      !(s & VIRTIO_CONFIG_S_DRIVER) || s & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
    ) {
      this.#guestError(`DriverFeatures written in status ${hex(s)}`);
      return;
    }
    if (this.#driverFeaturesSel > 1) {
      if (v !== 0) this.#guestError(`DriverFeatures word ${this.#driverFeaturesSel} set`);
      return;
    }
    const shift = BigInt(32 * this.#driverFeaturesSel);
    this.#driverFeatures = (this.#driverFeatures & ~(0xffffffffn << shift)) |
      (BigInt(v >>> 0) << shift);
  }

  #writeQueueField(offset: number, v: number): void {
    const M = VIRTIO_MMIO;
    const q = this.#selected;
    if (q === null) {
      this.#guestError(
        `queue register ${hex(offset)} of queue ${this.#queueSel}, which does not exist`,
      );
      return;
    }
    if (
      !(this.#status & VIRTIO_CONFIG_S_FEATURES_OK) || this.#status & VIRTIO_CONFIG_S_NEEDS_RESET
    ) {
      this.#guestError(`queue register ${hex(offset)} written in status ${hex(this.#status)}`);
      return;
    }
    if (q.ready) {
      this.#guestError(`queue ${this.#queueSel}: register ${hex(offset)} written while ready`);
      return;
    }
    switch (offset) {
      case M.QUEUE_NUM:
        q.num = v;
        return;
      case M.QUEUE_DESC_LOW:
        q.desc[0] = v;
        return;
      case M.QUEUE_DESC_HIGH:
        q.desc[1] = v;
        return;
      case M.QUEUE_DRIVER_LOW:
        q.driver[0] = v;
        return;
      case M.QUEUE_DRIVER_HIGH:
        q.driver[1] = v;
        return;
      case M.QUEUE_DEVICE_LOW:
        q.device[0] = v;
        return;
      case M.QUEUE_DEVICE_HIGH:
        q.device[1] = v;
        return;
    }
  }

  async #writeQueueReady(v: number): Promise<void> {
    const index = this.#queueSel;
    const q = this.#selected;
    if (q === null) {
      this.#guestError(`QueueReady of queue ${index}, which does not exist`);
      return;
    }
    if (v === 0) {
      if (q.started) {
        q.started = false;
        await this.#stop(index);
      }
      q.ready = false;
      return;
    }
    if (q.ready) return;
    if (
      !(this.#status & VIRTIO_CONFIG_S_FEATURES_OK) || this.#status & VIRTIO_CONFIG_S_NEEDS_RESET
    ) {
      this.#guestError(`queue ${index}: QueueReady in status ${hex(this.#status)}`);
      return;
    }
    const bad = this.#checkQueue(q);
    if (bad !== null) {
      this.#guestError(`queue ${index}: ${bad}: QueueReady ignored`);
      return;
    }
    q.ready = true;
    if (this.#status & VIRTIO_CONFIG_S_DRIVER_OK) await this.#start(index);
  }

  /** What the transport itself can check (RAM bounds are the backend's). */
  #checkQueue(q: QueueState): string | null {
    if (q.num === 0 || q.num > this.#b.queueNumMax || q.num > VIRTQUEUE_MAX_SIZE) {
      return `size ${q.num} not in 1..${this.#b.queueNumMax}`;
    }
    if ((q.num & (q.num - 1)) !== 0) return `size ${q.num} is not a power of two`;
    if (q.desc[0] % 16 !== 0) return `descriptor table at ${hex(addr(q.desc))} not 16-byte aligned`;
    if (q.driver[0] % 2 !== 0) return `driver area at ${hex(addr(q.driver))} not 2-byte aligned`;
    if (q.device[0] % 4 !== 0) return `device area at ${hex(addr(q.device))} not 4-byte aligned`;
    return null;
  }

  async #start(index: number): Promise<void> {
    const q = this.#queues[index];
    const config: VirtioMmioQueue = {
      index,
      size: q.num,
      desc: addr(q.desc),
      driver: addr(q.driver),
      device: addr(q.device),
    };
    try {
      await this.#b.startQueue(config, this.#driverFeatures);
      q.started = true;
    } catch (e) {
      await this.deviceError(`queue ${index} cannot start: ${(e as Error).message}`);
    }
  }

  async #stop(index: number): Promise<void> {
    try {
      await this.#b.stopQueue(index);
    } catch (e) {
      this.#log(`virtio-mmio: queue ${index}: stop failed: ${(e as Error).message}`);
    }
  }

  #notify(v: number): void {
    const q = this.#queues[v];
    if (q === undefined || !q.started) {
      this.#guestError(`QueueNotify for queue ${v}, which is not running`);
      return;
    }
    this.#b.notify?.(v);
  }

  async #writeStatus(v: number): Promise<void> {
    if (v === 0) return await this.reset();
    const old = this.#status;
    if (old & ~v & ~VIRTIO_CONFIG_S_NEEDS_RESET) {
      this.#guestError(`status ${hex(old)} -> ${hex(v)} clears bits (only a reset may)`);
      return;
    }
    const added = v & ~old & ~VIRTIO_CONFIG_S_NEEDS_RESET;
    let next = old | added;
    if (added & VIRTIO_CONFIG_S_FEATURES_OK) {
      const why = this.#featuresRefused(old);
      if (why !== null) {
        // 3.1.1: the driver re-reads the status and finds FEATURES_OK unset.
        this.#guestError(`FEATURES_OK refused: ${why}`);
        next &= ~VIRTIO_CONFIG_S_FEATURES_OK;
      }
    }
    if (added & VIRTIO_CONFIG_S_DRIVER_OK && !(next & VIRTIO_CONFIG_S_FEATURES_OK)) {
      this.#status = next & ~VIRTIO_CONFIG_S_DRIVER_OK;
      await this.deviceError("DRIVER_OK without FEATURES_OK");
      return;
    }
    this.#status = next;
    if (added & VIRTIO_CONFIG_S_DRIVER_OK && !(next & VIRTIO_CONFIG_S_NEEDS_RESET)) {
      for (let i = 0; i < this.#queues.length; i++) {
        const q = this.#queues[i];
        if (q.ready && !q.started) await this.#start(i);
        if (this.#status & VIRTIO_CONFIG_S_NEEDS_RESET) break;
      }
    }
  }

  #featuresRefused(old: number): string | null {
    if (!(old & VIRTIO_CONFIG_S_DRIVER)) return "DRIVER not set";
    if (old & VIRTIO_CONFIG_S_DRIVER_OK) return "after DRIVER_OK";
    const extra = this.#driverFeatures & ~this.#b.deviceFeatures;
    if (extra !== 0n) return `features ${hex(extra)} were not offered`;
    if (!(this.#driverFeatures & featureBit(VIRTIO_F_VERSION_1))) {
      return "VIRTIO_F_VERSION_1 not accepted (legacy drivers are not supported)";
    }
    return null;
  }

  /**
   * The device cannot go on (a queue failed to start, or broke in its
   * IOThread): DEVICE_NEEDS_RESET, every running queue stopped, and a
   * configuration-change interrupt (virtio 1.2, 2.1.2).
   */
  async deviceError(reason: string): Promise<void> {
    if (this.#status & VIRTIO_CONFIG_S_NEEDS_RESET) return;
    this.#log(`virtio-mmio: device needs reset: ${reason}`);
    this.#status |= VIRTIO_CONFIG_S_NEEDS_RESET;
    for (let i = 0; i < this.#queues.length; i++) {
      if (this.#queues[i].started) {
        this.#queues[i].started = false;
        await this.#stop(i);
      }
    }
    if (this.#status & VIRTIO_CONFIG_S_DRIVER_OK) {
      Atomics.or(this.#isr, 0, VIRTIO_MMIO_INT_CONFIG);
      this.#raiseIrq();
    }
  }

  /**
   * Device reset (status 0): stops every running queue after its requests
   * in flight (their completions still land in guest memory, as in QEMU,
   * which drains before a reset), then clears every register.
   */
  async reset(): Promise<void> {
    for (let i = 0; i < this.#queues.length; i++) {
      if (this.#queues[i].started) {
        this.#queues[i].started = false;
        await this.#stop(i);
      }
    }
    this.#queues = Array.from({ length: this.#b.numQueues }, newQueue);
    this.#status = 0;
    this.#deviceFeaturesSel = 0;
    this.#driverFeaturesSel = 0;
    this.#driverFeatures = 0n;
    this.#queueSel = 0;
    Atomics.store(this.#isr, 0, 0);
  }
}

function hex(v: number | bigint): string {
  return `0x${v.toString(16)}`;
}
