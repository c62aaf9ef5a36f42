/**
 * A vhost-user-blk front-end plus guest virtio-blk driver in one object: it
 * negotiates with a back-end (ours, or qemu-storage-daemon), lays out guest
 * RAM in a memfd, sets up N split rings with kick/call eventfds, and submits
 * block requests whose buffers live in that RAM. The equivalent of QEMU's
 * vhost-user-blk device plus Linux's virtio_blk driver, reduced to what tests
 * and benchmarks need.
 *
 * Each queue has `slots` request slots with fixed descriptor chains
 * (slot s = descriptors 3s, 3s+1, 3s+2: header, data, status) and fixed
 * buffers, so submitting and completing allocate nothing.
 *
 * @module
 */

import {
  close,
  ECONNREFUSED,
  ENOENT,
  Epoll,
  EPOLLIN,
  eventfd,
  eventfdRead,
  eventfdWrite,
  SysError,
} from "../sys/mod.ts";
import {
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_GET_CONFIG,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_INFLIGHT_FD,
  VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_GET_QUEUE_NUM,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,
  VHOST_USER_PROTOCOL_F_MQ,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
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
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
} from "../vhost_user/mod.ts";
import { FrontendError, VhostUserFrontend } from "./frontend.ts";
import { GPA_GAP, type GuestBuffer, GuestRam } from "./guest_ram.ts";
import { DriverQueue } from "./driver_queue.ts";
import {
  SECTOR_SIZE,
  VIRTIO_BLK_CONFIG,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_TOPOLOGY,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "./virtio_blk_defs.ts";

const bit = (n: number): bigint => 1n << BigInt(n);

/** The features the client can drive. */
const DRIVER_FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) |
  bit(VIRTIO_BLK_F_SIZE_MAX) | bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_RO) |
  bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_TOPOLOGY) |
  bit(VIRTIO_BLK_F_CONFIG_WCE) | bit(VIRTIO_BLK_F_MQ) | bit(VIRTIO_BLK_F_DISCARD) |
  bit(VIRTIO_BLK_F_WRITE_ZEROES);

/** The protocol features the client uses. */
const DRIVER_PROTOCOL_FEATURES = bit(VHOST_USER_PROTOCOL_F_MQ) |
  bit(VHOST_USER_PROTOCOL_F_REPLY_ACK) | bit(VHOST_USER_PROTOCOL_F_CONFIG);

/** Options of {@link VhostUserBlkClient.connect}. */
export interface BlkClientOptions {
  /** Virtqueues to set up (default 1). */
  numQueues?: number;
  /** Ring size (default 256). */
  queueSize?: number;
  /** Request slots per queue = the most requests in flight on it (default min(64, queueSize / 3)). */
  slots?: number;
  /** Largest data buffer of one request (default 128 KiB). */
  maxBlockSize?: number;
  /** Guest RAM regions (default 2: rings in the first, data in the last). */
  regions?: number;
  /** Guest-physical hole after each region (default GPA_GAP; 0: adjacent regions). */
  regionGap?: number;
  /** Negotiate VIRTIO_RING_F_EVENT_IDX when offered (default true). */
  eventIdx?: boolean;
  /** Per-reply timeout in ms (default 5000). */
  timeoutMs?: number;
  /** Stop after connecting and negotiating (server tests drive the rest step by step). */
  negotiateOnly?: boolean;
  /**
   * Negotiate VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD when offered (default
   * false): get the inflight region once (GET_INFLIGHT_FD), keep it, and hand
   * it back on every (re)connection (SET_INFLIGHT_FD), as QEMU's
   * vhost-user-blk does, so a back-end restarted by {@link VhostUserBlkClient.reconnect}
   * takes again what was in flight.
   */
  inflight?: boolean;
}

/** The inflight region the client keeps for the back-end (GET_INFLIGHT_FD reply). */
export interface ClientInflightRegion {
  /** The region's fd (owned by the client). */
  fd: number;
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}

/** The parts of `struct virtio_blk_config` the client reads. */
export interface BlkConfig {
  /** Capacity in 512-byte sectors. */
  capacity: number;
  /** Logical block size (bytes), 512 without VIRTIO_BLK_F_BLK_SIZE. */
  blkSize: number;
  /** Number of queues the device has (1 without VIRTIO_BLK_F_MQ). */
  numQueues: number;
  /** Largest segment (bytes), 0 if not given. */
  sizeMax: number;
  /** Most segments per request, 0 if not given. */
  segMax: number;
  /** Most sectors per discard. */
  maxDiscardSectors: number;
  /** Most sectors per write-zeroes. */
  maxWriteZeroesSectors: number;
  /** Writeback cache enabled. */
  writeback: boolean;
}

/** Called for every completed request: slot, status byte, used length. */
export type BlkCompletion = (slot: number, status: number, usedLen: number) => void;

/**
 * One virtqueue of the device with its request slots. Build requests with
 * the submit methods, make them visible with {@link BlkQueue.notify}, collect
 * them with {@link BlkQueue.reap}.
 */
export class BlkQueue {
  /** Queue index. */
  readonly index: number;
  /** The split ring. */
  readonly ring: DriverQueue;
  /** Request slots (most requests in flight). */
  readonly slots: number;
  /** Kick eventfd (we write, the back-end reads). */
  readonly kickFd: number;
  /** Called by {@link reap} for each completion; set it once (hot path). */
  onComplete: BlkCompletion = () => {};
  /** Kicks sent (eventfd writes). */
  kicks = 0;

  readonly #meta: GuestBuffer;
  readonly #metaView: DataView;
  readonly #data: GuestBuffer[];
  readonly #maxBlock: number;

  constructor(index: number, ring: DriverQueue, ram: GuestRam, slots: number, maxBlock: number) {
    this.index = index;
    this.ring = ring;
    this.slots = slots;
    this.#maxBlock = maxBlock;
    this.kickFd = eventfd();
    // 32 bytes of metadata per slot: 16-byte header, status at +16.
    this.#meta = ram.alloc(0, 32 * slots, 64);
    this.#metaView = new DataView(this.#meta.bytes.buffer, this.#meta.bytes.byteOffset, 32 * slots);
    const dataRegion = ram.regions.length - 1;
    this.#data = [];
    for (let s = 0; s < slots; s++) this.#data.push(ram.alloc(dataRegion, maxBlock, 4096));
  }

  /** The data buffer of `slot` (guest memory, no copy). */
  data(slot: number): Uint8Array {
    return this.#data[slot].bytes;
  }

  /** The status byte the device wrote for `slot`. */
  status(slot: number): number {
    return this.#metaView.getUint8(32 * slot + 16);
  }

  /**
   * Builds and queues a request on `slot`: header (type, sector), optional
   * data of `len` bytes (`deviceWrites`: the device fills it), status.
   * Hot path: no allocation.
   */
  submit(slot: number, type: number, sector: number, len: number, deviceWrites: boolean): void {
    if (len > this.#maxBlock) throw new RangeError(`request of ${len} bytes > slot buffer`);
    const mv = this.#metaView;
    const m = 32 * slot;
    mv.setUint32(m, type, true);
    mv.setUint32(m + 4, 0, true);
    mv.setUint32(m + 8, sector >>> 0, true);
    mv.setUint32(m + 12, Math.floor(sector / 0x1_0000_0000), true);
    mv.setUint8(m + 16, 0xff); // so a completion that forgot the status is visible
    const metaGpa = this.#meta.gpa + m;
    const d = 3 * slot;
    const r = this.ring;
    if (len > 0) {
      r.setDesc(d, metaGpa, 16, VIRTQ_DESC_F_NEXT, d + 1);
      r.setDesc(
        d + 1,
        this.#data[slot].gpa,
        len,
        VIRTQ_DESC_F_NEXT | (deviceWrites ? VIRTQ_DESC_F_WRITE : 0),
        d + 2,
      );
    } else {
      r.setDesc(d, metaGpa, 16, VIRTQ_DESC_F_NEXT, d + 2);
    }
    r.setDesc(d + 2, metaGpa + 16, 1, VIRTQ_DESC_F_WRITE, 0);
    r.addAvail(d);
  }

  /** Queues a read of `len` bytes at byte `offset` into the slot's buffer. Hot path. */
  read(slot: number, offset: number, len: number): void {
    this.submit(slot, VIRTIO_BLK_T_IN, offset / SECTOR_SIZE, len, true);
  }

  /** Queues a write of the slot's first `len` bytes at byte `offset`. Hot path. */
  write(slot: number, offset: number, len: number): void {
    this.submit(slot, VIRTIO_BLK_T_OUT, offset / SECTOR_SIZE, len, false);
  }

  /** Queues a flush. */
  flush(slot: number): void {
    this.submit(slot, VIRTIO_BLK_T_FLUSH, 0, 0, false);
  }

  /** Queues a discard of `len` bytes at `offset` (one segment). */
  discard(slot: number, offset: number, len: number): void {
    this.#segment(slot, offset, len, 0);
    this.submit(slot, VIRTIO_BLK_T_DISCARD, 0, 16, false);
  }

  /** Queues a write-zeroes of `len` bytes at `offset` (one segment). */
  writeZeroes(slot: number, offset: number, len: number, unmap = false): void {
    this.#segment(slot, offset, len, unmap ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0);
    this.submit(slot, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false);
  }

  /** Queues GET_ID: the 20-byte id lands in the slot's buffer. */
  getId(slot: number): void {
    this.submit(slot, VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, true);
  }

  #segment(slot: number, offset: number, len: number, flags: number): void {
    const dv = new DataView(this.#data[slot].bytes.buffer, this.#data[slot].bytes.byteOffset, 16);
    const sector = offset / SECTOR_SIZE;
    dv.setUint32(0, sector >>> 0, true);
    dv.setUint32(4, Math.floor(sector / 0x1_0000_0000), true);
    dv.setUint32(8, len / SECTOR_SIZE, true);
    dv.setUint32(12, flags, true);
  }

  /** Publishes queued requests and kicks the back-end if it asked for it. Hot path. */
  notify(): void {
    if (this.ring.publish()) {
      eventfdWrite(this.kickFd, 1);
      this.kicks++;
    }
  }

  /** Completes every used request (calls {@link onComplete}); returns how many. Hot path. */
  reap(): number {
    let n = 0;
    for (;;) {
      const id = this.ring.popUsed();
      if (id < 0) return n;
      const slot = id / 3;
      if (id % 3 !== 0 || slot >= this.slots) {
        throw new Error(`device returned unknown descriptor head ${id} on queue ${this.index}`);
      }
      n++;
      this.onComplete(slot, this.status(slot), this.ring.usedLen);
    }
  }
}

/** How to wait for completions: spin on the used rings, sleep on the call eventfd, or await it. */
export type WaitMode = "poll" | "block" | "async";

/**
 * A connected vhost-user-blk device.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VhostUserBlkClient } from "./blk_client.ts";
 * // Needs a back-end; see tests/client/client_qsd_test.ts.
 * assert.equal(typeof VhostUserBlkClient.connect, "function");
 * ```
 */
export class VhostUserBlkClient {
  /** The control channel (replaced by {@link reconnect}). */
  frontend: VhostUserFrontend;
  /** The socket path connected to. */
  readonly path: string;
  /** The inflight region kept across reconnections (INFLIGHT_SHMFD negotiated), or null. */
  inflight: ClientInflightRegion | null = null;
  /** Successful {@link reconnect}s. */
  reconnects = 0;
  /** Features offered by the back-end. */
  offeredFeatures = 0n;
  /** Features acknowledged (offered & what the client drives). */
  features = 0n;
  /** Protocol features acknowledged. */
  protocolFeatures = 0n;
  /** Queues the back-end supports (GET_QUEUE_NUM, or 1 without MQ). */
  maxQueues = 1;
  /** Device configuration (after {@link negotiate}). */
  config: BlkConfig = {
    capacity: 0,
    blkSize: SECTOR_SIZE,
    numQueues: 1,
    sizeMax: 0,
    segMax: 0,
    maxDiscardSectors: 0,
    maxWriteZeroesSectors: 0,
    writeback: false,
  };
  /** Guest RAM (after {@link setupMemory}). */
  ram: GuestRam | null = null;
  /** The queues (after {@link setupQueues}). */
  readonly queues: BlkQueue[] = [];
  /** The call eventfd shared by every queue. */
  readonly callFd: number;
  /** Calls (interrupts) consumed. */
  interrupts = 0;
  readonly #opts: Required<BlkClientOptions>;
  readonly #epoll: Epoll;
  #closed = false;

  private constructor(
    frontend: VhostUserFrontend,
    path: string,
    opts: Required<BlkClientOptions>,
  ) {
    this.frontend = frontend;
    this.path = path;
    this.#opts = opts;
    this.callFd = eventfd();
    this.#epoll = new Epoll(4);
    this.#epoll.add(this.callFd, EPOLLIN);
  }

  /** Connects to `path` and sets the device up (unless `negotiateOnly`). */
  static async connect(path: string, opts: BlkClientOptions = {}): Promise<VhostUserBlkClient> {
    const queueSize = opts.queueSize ?? 256;
    const full: Required<BlkClientOptions> = {
      numQueues: opts.numQueues ?? 1,
      queueSize,
      slots: opts.slots ?? Math.min(64, Math.floor(queueSize / 3)),
      maxBlockSize: opts.maxBlockSize ?? 128 * 1024,
      regions: opts.regions ?? 2,
      regionGap: opts.regionGap ?? GPA_GAP,
      eventIdx: opts.eventIdx ?? true,
      timeoutMs: opts.timeoutMs ?? 5000,
      negotiateOnly: opts.negotiateOnly ?? false,
      inflight: opts.inflight ?? false,
    };
    if (3 * full.slots > queueSize) throw new RangeError("slots * 3 must fit in the queue");
    const fe = await VhostUserFrontend.connect(path, full.timeoutMs);
    const c = new VhostUserBlkClient(fe, path, full);
    try {
      await c.negotiate();
      if (!full.negotiateOnly) {
        await c.setupInflight();
        await c.setupMemory();
        await c.setupQueues();
      }
    } catch (err) {
      c.#closeLocal();
      throw err;
    }
    return c;
  }

  /** Whether the device is read-only (VIRTIO_BLK_F_RO). */
  get readOnly(): boolean {
    return (this.features & bit(VIRTIO_BLK_F_RO)) !== 0n;
  }

  /** Whether feature bit `n` was acknowledged. */
  hasFeature(n: number): boolean {
    return (this.features & bit(n)) !== 0n;
  }

  /** GET_FEATURES, protocol features, queue count, SET_OWNER, GET_CONFIG, SET_FEATURES. */
  async negotiate(): Promise<void> {
    const fe = this.frontend;
    const f = await fe.request(VHOST_USER_GET_FEATURES, { kind: "empty" }, [], "u64");
    if (f.payload.kind !== "u64") throw new FrontendError("badReply", "GET_FEATURES");
    this.offeredFeatures = f.payload.value;
    let want = DRIVER_FEATURES;
    if (this.#opts.eventIdx) want |= bit(VIRTIO_RING_F_EVENT_IDX);
    this.features = this.offeredFeatures & want;
    if ((this.features & bit(VIRTIO_F_VERSION_1)) === 0n) {
      throw new FrontendError("badReply", "back-end does not offer VIRTIO_F_VERSION_1");
    }
    if (this.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
      const p = await fe.request(VHOST_USER_GET_PROTOCOL_FEATURES, { kind: "empty" }, [], "u64");
      if (p.payload.kind !== "u64") throw new FrontendError("badReply", "GET_PROTOCOL_FEATURES");
      const want = DRIVER_PROTOCOL_FEATURES |
        (this.#opts.inflight ? bit(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) : 0n);
      this.protocolFeatures = p.payload.value & want;
      await fe.request(VHOST_USER_SET_PROTOCOL_FEATURES, {
        kind: "u64",
        value: this.protocolFeatures,
      });
      fe.replyAck = (this.protocolFeatures & bit(VHOST_USER_PROTOCOL_F_REPLY_ACK)) !== 0n;
    }
    if (this.protocolFeatures & bit(VHOST_USER_PROTOCOL_F_MQ)) {
      const q = await fe.request(VHOST_USER_GET_QUEUE_NUM, { kind: "empty" }, [], "u64");
      if (q.payload.kind !== "u64") throw new FrontendError("badReply", "GET_QUEUE_NUM");
      this.maxQueues = Number(q.payload.value);
    }
    if (this.#opts.numQueues > this.maxQueues) {
      throw new FrontendError(
        "badReply",
        `back-end supports ${this.maxQueues} queues, ${this.#opts.numQueues} requested`,
      );
    }
    await fe.request(VHOST_USER_SET_OWNER, { kind: "empty" });
    if (this.protocolFeatures & bit(VHOST_USER_PROTOCOL_F_CONFIG)) await this.readConfig();
    await fe.request(VHOST_USER_SET_FEATURES, { kind: "u64", value: this.features });
  }

  /** GET_CONFIG of the virtio-blk config space into {@link config}. */
  async readConfig(): Promise<BlkConfig> {
    const r = await this.frontend.request(
      VHOST_USER_GET_CONFIG,
      {
        kind: "config",
        offset: 0,
        flags: 0,
        data: new Uint8Array(VIRTIO_BLK_CONFIG.size),
      },
      [],
      "config",
    );
    if (r.payload.kind !== "config") throw new FrontendError("badReply", "GET_CONFIG failed");
    const d = r.payload.data;
    const dv = new DataView(d.buffer, d.byteOffset, d.byteLength);
    const C = VIRTIO_BLK_CONFIG;
    const has = (n: number) => this.offeredFeatures & bit(n);
    this.config = {
      capacity: Number(dv.getBigUint64(C.capacity, true)),
      blkSize: has(VIRTIO_BLK_F_BLK_SIZE) ? dv.getUint32(C.blk_size, true) : SECTOR_SIZE,
      numQueues: has(VIRTIO_BLK_F_MQ) ? dv.getUint16(C.num_queues, true) : 1,
      sizeMax: has(VIRTIO_BLK_F_SIZE_MAX) ? dv.getUint32(C.size_max, true) : 0,
      segMax: has(VIRTIO_BLK_F_SEG_MAX) ? dv.getUint32(C.seg_max, true) : 0,
      maxDiscardSectors: has(VIRTIO_BLK_F_DISCARD) ? dv.getUint32(C.max_discard_sectors, true) : 0,
      maxWriteZeroesSectors: has(VIRTIO_BLK_F_WRITE_ZEROES)
        ? dv.getUint32(C.max_write_zeroes_sectors, true)
        : 0,
      writeback: dv.getUint8(C.writeback) !== 0,
    };
    return this.config;
  }

  /**
   * Turns the device's write cache on or off through the config space's
   * `writeback` byte (VIRTIO_BLK_F_CONFIG_WCE, SET_CONFIG), as a guest driver
   * does for `echo "write through" > /sys/block/vda/queue/write_cache`. Off
   * (writethrough) means every write is durable before it completes.
   */
  async setWriteback(on: boolean): Promise<void> {
    if (!this.hasFeature(VIRTIO_BLK_F_CONFIG_WCE)) {
      throw new FrontendError("badReply", "the device does not offer CONFIG_WCE");
    }
    await this.frontend.request(VHOST_USER_SET_CONFIG, {
      kind: "config",
      offset: VIRTIO_BLK_CONFIG.writeback,
      flags: 0,
      data: new Uint8Array([on ? 1 : 0]),
    });
    this.config.writeback = on;
  }

  /** Allocates guest RAM and sends SET_MEM_TABLE (one fd per region, the same memfd). */
  async setupMemory(): Promise<void> {
    const o = this.#opts;
    // Per queue: desc 16N + avail 2N + used 8N (+ alignment) and 32 bytes of metadata a slot.
    const ringBytes = o.numQueues * (26 * o.queueSize + 4 * 4096 + 32 * o.slots + 64);
    const dataBytes = o.numQueues * o.slots * o.maxBlockSize + 4096;
    const per = (o.regions === 1 ? ringBytes + dataBytes : Math.max(ringBytes, dataBytes)) +
      (1 << 20);
    this.ram = GuestRam.create(per * o.regions, o.regions, o.regionGap);
    await this.#sendMemTable();
  }

  /** SET_MEM_TABLE of the client's RAM. */
  async #sendMemTable(): Promise<void> {
    const regions = this.ram!.regions.map((r) => ({
      guestPhysAddr: BigInt(r.guestPhysAddr),
      size: BigInt(r.size),
      userAddr: BigInt(r.userAddr),
      mmapOffset: BigInt(r.mmapOffset),
    }));
    await this.frontend.request(
      VHOST_USER_SET_MEM_TABLE,
      { kind: "memTable", regions },
      regions.map(() => this.ram!.fd),
    );
  }

  /**
   * With INFLIGHT_SHMFD negotiated: GET_INFLIGHT_FD the first time (the
   * region is kept), then SET_INFLIGHT_FD (QEMU's vhost_user_blk_start:
   * vhost_dev_get_inflight once, vhost_dev_set_inflight on every start).
   */
  async setupInflight(): Promise<void> {
    if ((this.protocolFeatures & bit(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)) === 0n) return;
    const fe = this.frontend;
    if (this.inflight === null) {
      const r = await fe.request(
        VHOST_USER_GET_INFLIGHT_FD,
        {
          kind: "inflight",
          mmapSize: 0n,
          mmapOffset: 0n,
          numQueues: this.#opts.numQueues,
          queueSize: this.#opts.queueSize,
        },
        [],
        "inflight",
      );
      if (r.payload.kind !== "inflight" || r.fds.length !== 1) {
        for (const fd of r.fds) close(fd);
        throw new FrontendError("badReply", "GET_INFLIGHT_FD");
      }
      this.inflight = { fd: r.fds[0], ...r.payload };
    }
    const { fd, ...desc } = this.inflight;
    await fe.request(VHOST_USER_SET_INFLIGHT_FD, { kind: "inflight", ...desc }, [fd]);
  }

  /** Lays out the rings and sends SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE for each queue. */
  async setupQueues(): Promise<void> {
    const o = this.#opts;
    const ram = this.ram!;
    const eventIdx = this.hasFeature(VIRTIO_RING_F_EVENT_IDX);
    for (let i = 0; i < o.numQueues; i++) {
      const ring = new DriverQueue(ram, 0, o.queueSize, eventIdx);
      this.queues.push(new BlkQueue(i, ring, ram, o.slots, o.maxBlockSize));
    }
    await this.#startRings(() => 0);
  }

  /** SET_VRING_NUM/BASE/ADDR/KICK/CALL for every queue, then ENABLE. */
  async #startRings(base: (q: BlkQueue) => number): Promise<void> {
    const o = this.#opts;
    const fe = this.frontend;
    for (const q of this.queues) {
      const i = q.index;
      const ring = q.ring;
      await fe.request(VHOST_USER_SET_VRING_NUM, {
        kind: "vringState",
        index: i,
        num: o.queueSize,
      });
      await fe.request(VHOST_USER_SET_VRING_BASE, { kind: "vringState", index: i, num: base(q) });
      await fe.request(VHOST_USER_SET_VRING_ADDR, {
        kind: "vringAddr",
        index: i,
        flags: 0,
        descUserAddr: BigInt(ring.desc.addr),
        usedUserAddr: BigInt(ring.used.addr),
        availUserAddr: BigInt(ring.avail.addr),
        logGuestAddr: 0n,
      });
      await fe.request(VHOST_USER_SET_VRING_KICK, { kind: "u64", value: BigInt(i) }, [q.kickFd]);
      await fe.request(VHOST_USER_SET_VRING_CALL, { kind: "u64", value: BigInt(i) }, [this.callFd]);
    }
    if (this.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
      for (let i = 0; i < o.numQueues; i++) {
        await fe.request(VHOST_USER_SET_VRING_ENABLE, { kind: "vringState", index: i, num: 1 });
      }
    }
  }

  /**
   * Waits until some queue has completions (does not reap them). `poll`
   * spins; `block` sleeps in epoll_wait on the call eventfd (this thread's
   * event loop stops meanwhile); use {@link waitAsync} when the back-end runs
   * in this thread. Returns false on timeout. Hot path for `poll`/`block`.
   */
  wait(mode: "poll" | "block", timeoutMs = this.#opts.timeoutMs): boolean {
    const qs = this.queues;
    if (mode === "poll") {
      const deadline = performance.now() + timeoutMs;
      for (let spins = 0;; spins++) {
        for (let i = 0; i < qs.length; i++) if (qs[i].ring.hasUsed()) return true;
        if ((spins & 1023) === 1023 && performance.now() > deadline) return false;
      }
    }
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      let ready = false;
      for (let i = 0; i < qs.length; i++) if (qs[i].ring.enableInterrupts()) ready = true;
      if (ready) return true;
      // epoll_wait also returns 0 when a signal interrupts it (EINTR): only
      // the clock says whether the time is up.
      const left = Math.ceil(deadline - performance.now());
      if (left <= 0) return false;
      if (this.#epoll.wait(left) > 0 && eventfdRead(this.callFd) > 0) this.interrupts++;
    }
  }

  /** Like {@link wait} in `block` mode, but lets this thread's event loop run (control plane speed). */
  async waitAsync(timeoutMs = this.#opts.timeoutMs): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    const qs = this.queues;
    for (;;) {
      let ready = false;
      for (let i = 0; i < qs.length; i++) if (qs[i].ring.enableInterrupts()) ready = true;
      if (ready) return true;
      const left = deadline - Date.now();
      if (left <= 0) return false;
      if (await this.#epoll.waitAsync(Math.min(left, 100)) > 0 && eventfdRead(this.callFd) > 0) {
        this.interrupts++;
      }
    }
  }

  /** Puts every queue in busy-polling mode (no interrupts). */
  disableInterrupts(): void {
    for (const q of this.queues) q.ring.disableInterrupts();
  }

  /**
   * Runs one request to completion on slot 0 of queue `qi` and returns its
   * status (VIRTIO_BLK_S_*). `build` queues it (e.g. `(q) => q.read(0, 0, 4096)`).
   * Control plane helper for tests; awaits so a same-thread back-end can run.
   */
  async execute(qi: number, build: (q: BlkQueue) => void, timeoutMs?: number): Promise<number> {
    const q = this.queues[qi];
    const saved = q.onComplete;
    let status = -1;
    q.onComplete = (_slot, st) => status = st;
    try {
      build(q);
      q.notify();
      while (status < 0) {
        if (!await this.waitAsync(timeoutMs)) {
          throw new FrontendError("timeout", `request on queue ${qi} did not complete`);
        }
        q.reap();
      }
    } finally {
      q.onComplete = saved;
    }
    return status === 0xff ? VIRTIO_BLK_S_IOERR : status;
  }

  /** GET_VRING_BASE on every queue (stops them in the back-end); returns the bases. */
  async stopQueues(): Promise<number[]> {
    const bases: number[] = [];
    for (const q of this.queues) {
      const r = await this.frontend.request(
        VHOST_USER_GET_VRING_BASE,
        { kind: "vringState", index: q.index, num: 0 },
        [],
        "vringState",
      );
      if (r.payload.kind !== "vringState") throw new FrontendError("badReply", "GET_VRING_BASE");
      bases.push(r.payload.num);
    }
    return bases;
  }

  /**
   * Plays QEMU after the back-end went away (vhost_user_blk_disconnect,
   * then _connect with `reconnect=N`): connects to the same socket again
   * (retrying while nobody listens, up to `timeoutMs`), negotiates, hands
   * back the inflight region (SET_INFLIGHT_FD), the same memory and rings.
   * GET_VRING_BASE cannot reach a dead back-end, so each ring restarts at
   * the used idx the back-end last published, as QEMU does
   * (virtio_queue_restore_last_avail_idx): right only for in-order
   * completion unless the back-end resumes from the inflight region.
   * Requests in flight stay in flight: the restarted back-end completes them.
   */
  async reconnect(timeoutMs = 10_000): Promise<void> {
    if (this.ram === null) throw new FrontendError("closed", "reconnect before set-up");
    this.frontend.close();
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        this.frontend = await VhostUserFrontend.connect(this.path, this.#opts.timeoutMs);
        break;
      } catch (e) {
        const retry = e instanceof SysError && (e.errno === ECONNREFUSED || e.errno === ENOENT);
        if (!retry || Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    await this.negotiate();
    await this.setupInflight();
    await this.#sendMemTable();
    await this.#startRings((q) => q.ring.usedIdx);
    this.reconnects++;
  }

  /** Stops the queues (best effort), disconnects and frees everything; idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    try {
      if (this.queues.length > 0) await this.stopQueues();
    } catch { /* back-end already gone */ }
    this.#closeLocal();
  }

  #closeLocal(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.frontend.close();
    for (const q of this.queues) close(q.kickFd);
    this.#epoll.close();
    close(this.callFd);
    this.ram?.close();
    this.ram = null;
    if (this.inflight !== null) close(this.inflight.fd);
    this.inflight = null;
  }
}
