/**
 * Helpers for the robustness tests: scratch images, a host run as a separate
 * process (so a crash shows as an exit status and `kill -9` is real), a host in
 * this process, and a "hostile guest" that writes arbitrary descriptor chains
 * into a connected client's rings and collects what the device answers.
 *
 * @module
 */

import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../client/blk_client.ts";
import { patternWord } from "../../client/workload.ts";
import type { GuestBuffer } from "../../client/guest_ram.ts";
import { VHOST_USER_SET_FEATURES, VHOST_USER_SET_VRING_ERR } from "../../vhost_user/mod.ts";
import { close, eventfd, eventfdRead, eventfdWrite } from "../../sys/mod.ts";
import { ServerProcess } from "../harness/mod.ts";

export const MiB = 1 << 20;
/** Reply / completion timeout of the tests' clients (the host may share 2 CPUs with others). */
export const TIMEOUT_MS = 20000;
const REPO = new URL("../../", import.meta.url).pathname;
const HOST_MAIN = new URL("../../dataplane/main.ts", import.meta.url).pathname;

/**
 * A scratch directory (on the repository's file system: O_DIRECT works) with a
 * sparse image of `size` bytes and a socket path: the e2e tests' helper.
 */
export { type HostScratch as Scratch, hostScratch as scratch } from "../e2e/host_util.ts";

/** Starts a host in this process from CLI-style flags; log lines are collected. */
export { startHost } from "../e2e/host_util.ts";

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` until it holds or `ms` pass; returns whether it held. */
export async function waitFor(cond: () => boolean, ms = TIMEOUT_MS): Promise<boolean> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) return false;
    await sleep(2);
  }
  return true;
}

/**
 * `deno run -A dataplane/main.ts ...` as a child process: stderr is collected,
 * {@link ready} resolves once it logs that it serves.
 */
/**
 * The host command line the robustness tests share: serve `s.image` on
 * `s.socket` with cache=none, engine `aio`, `queues` queues (and `iothreads`
 * IOThreads when given).
 */
export function cacheNoneHost(
  s: { image: string; socket: string },
  aio: string,
  queues: number,
  iothreads?: number,
): string[] {
  const args = ["--image", s.image, "--socket", s.socket, "--cache", "none", "--aio", aio];
  args.push("--queues", String(queues));
  if (iothreads !== undefined) args.push("--iothreads", String(iothreads));
  return args;
}

export class HostProcess extends ServerProcess {
  readonly socket: string;

  constructor(args: string[]) {
    super(Deno.execPath(), ["run", "-A", "--no-check", HOST_MAIN, ...args], { cwd: REPO });
    const i = args.indexOf("--socket");
    this.socket = args[i + 1];
  }

  /** Resolves when the host listens; throws with its log if it exits first or takes > 20 s. */
  async ready(): Promise<void> {
    const ok = await waitFor(() => this.exited || /serving /.test(this.stderr), 20000);
    if (!ok || this.exited) throw new Error(`host did not start:\n${this.stderr}`);
  }

  /** VmRSS of the host in KiB. */
  rssKiB(): number {
    const s = Deno.readTextFileSync(`/proc/${this.pid}/status`);
    const m = /VmRSS:\s+(\d+) kB/.exec(s);
    if (!m) throw new Error("no VmRSS");
    return Number(m[1]);
  }

  /**
   * SIGUSR1: the host logs its counters and every ring's state. Returns that
   * dump, or a note that none came within 3 s (a stuck IOThread).
   */
  async dumpState(): Promise<string> {
    const before = this.stderr.length;
    Deno.kill(this.pid, "SIGUSR1");
    const ok = await waitFor(() => this.stderr.indexOf("SIGUSR1: ", before) >= 0, 3000);
    await sleep(200); // the rest of the dump
    return ok ? this.stderr.slice(before) : `(no SIGUSR1 dump in 3 s)\n${this.stderr.slice(-2000)}`;
  }

  /** SIGTERM and expect a clean exit (status 0, no signal). */
  async stopCleanly(): Promise<void> {
    const st = await this.stop("SIGTERM", 15000);
    assert.equal(st.signal, null, `host died by ${st.signal}:\n${this.stderr}`);
    assert.equal(st.code, 0, `host exit status ${st.code}:\n${this.stderr}`);
  }
}

/** Connects, retrying while the listener is between two front-ends. */
export async function connect(
  socket: string,
  opts: Parameters<typeof VhostUserBlkClient.connect>[1] = {},
): Promise<VhostUserBlkClient> {
  let last: unknown;
  for (let i = 0; i < 100; i++) {
    try {
      // Generous timeouts: the suite runs beside benchmarks on a small machine.
      return await VhostUserBlkClient.connect(socket, { timeoutMs: TIMEOUT_MS, ...opts });
    } catch (e) {
      last = e;
      await sleep(20);
    }
  }
  throw last;
}

// ---- hostile guest ------------------------------------------------------------------

/** VRING_DESC_F_* (virtio 1.2 2.7.5). */
export const NEXT = 1, WRITE = 2, INDIRECT = 4;
/** VIRTIO_F_RING_INDIRECT_DESC feature bit. */
const INDIRECT_DESC_BIT = 1n << 28n;

/** One raw descriptor as the hostile guest writes it. */
export interface RawDesc {
  addr: bigint | number;
  len: number;
  flags: number;
  /** Next index (table index, or index in the indirect table). */
  next?: number;
}

/** What the device answered for one raw chain. */
export interface RawResult {
  head: number;
  usedLen: number;
  status: number;
}

/**
 * A connected client plus what is needed to send hand-made chains on its
 * queues: spare descriptors (above the client's request slots), spare guest
 * memory, and an error eventfd per queue (SET_VRING_ERR).
 */
export class HostileGuest {
  readonly client: VhostUserBlkClient;
  readonly errFds: number[] = [];
  /** First descriptor index not used by the client's slots. */
  readonly #firstFree: number;
  #nextDesc: number[];

  private constructor(client: VhostUserBlkClient) {
    this.client = client;
    this.#firstFree = 3 * client.queues[0].slots;
    this.#nextDesc = client.queues.map(() => this.#firstFree);
  }

  /**
   * Connects with `numQueues` rings of 64 (8 request slots each),
   * negotiates INDIRECT_DESC too, and installs an err eventfd per ring.
   */
  static async connect(
    socket: string,
    numQueues = 2,
    opts: { regions?: number; regionGap?: number } = {},
  ): Promise<HostileGuest> {
    const c = await connect(socket, {
      numQueues,
      queueSize: 64,
      slots: 8,
      negotiateOnly: true,
      ...opts,
    });
    try {
      if ((c.offeredFeatures & INDIRECT_DESC_BIT) !== 0n) {
        c.features |= INDIRECT_DESC_BIT;
        await c.frontend.request(VHOST_USER_SET_FEATURES, { kind: "u64", value: c.features });
      }
      await c.setupMemory();
      await c.setupQueues();
    } catch (e) {
      await c.close();
      throw e;
    }
    const g = new HostileGuest(c);
    for (let i = 0; i < numQueues; i++) {
      const fd = eventfd();
      g.errFds.push(fd);
      await c.frontend.request(VHOST_USER_SET_VRING_ERR, { kind: "u64", value: BigInt(i) }, [fd]);
    }
    return g;
  }

  /** Guest memory for buffers (in the data region). */
  alloc(len: number, align = 16): GuestBuffer {
    const ram = this.client.ram!;
    return ram.alloc(ram.regions.length - 1, len, align);
  }

  /** A 16-byte request header (type, sector) followed by `extra` zero bytes, in guest memory. */
  header(type: number, sector: bigint, extra = 0): GuestBuffer {
    const b = this.alloc(16 + extra);
    const dv = new DataView(b.bytes.buffer, b.bytes.byteOffset, 16);
    dv.setUint32(0, type, true);
    dv.setUint32(4, 0, true);
    dv.setBigUint64(8, BigInt.asUintN(64, sector), true);
    return b;
  }

  /** A status byte buffer, pre-set to 0xff so a missing write shows. */
  statusByte(): GuestBuffer {
    const b = this.alloc(1);
    b.bytes[0] = 0xff;
    return b;
  }

  /** Reserves `n` consecutive spare descriptor indexes on queue `qi`. */
  descs(qi: number, n: number): number[] {
    const size = this.client.queues[qi].ring.size;
    const out: number[] = [];
    for (let k = 0; k < n; k++) {
      if (this.#nextDesc[qi] >= size) this.#nextDesc[qi] = this.#firstFree;
      out.push(this.#nextDesc[qi]++);
    }
    return out;
  }

  /** Writes raw descriptor `i` of queue `qi`'s table (or of a table at host bytes `table`). */
  setDesc(qi: number, i: number, d: RawDesc, table?: Uint8Array): void {
    const bytes = table ?? this.client.queues[qi].ring.desc.bytes;
    const dv = new DataView(bytes.buffer, bytes.byteOffset + 16 * i, 16);
    dv.setBigUint64(0, BigInt.asUintN(64, BigInt(d.addr)), true);
    dv.setUint32(8, d.len >>> 0, true);
    dv.setUint16(12, d.flags, true);
    dv.setUint16(14, d.next ?? 0, true);
  }

  /**
   * Writes `bufs` as a chain of spare descriptors on queue `qi` (NEXT links
   * added, unless a descriptor already carries its own `next`), returns the head.
   */
  chain(qi: number, bufs: RawDesc[]): number {
    const idx = this.descs(qi, bufs.length);
    bufs.forEach((b, k) => {
      const last = k === bufs.length - 1;
      const flags = b.flags | (last ? 0 : NEXT);
      this.setDesc(qi, idx[k], { ...b, flags, next: b.next ?? (last ? 0 : idx[k + 1]) });
    });
    return idx[0];
  }

  /** Makes `head` available on queue `qi` and kicks. */
  submit(qi: number, head: number): void {
    const q = this.client.queues[qi];
    q.ring.addAvail(head);
    q.ring.publish();
    eventfdWrite(q.kickFd, 1);
  }

  /** Waits for the next used entry of queue `qi`; null after `ms` without one. */
  async nextUsed(qi: number, ms = TIMEOUT_MS): Promise<{ head: number; usedLen: number } | null> {
    const ring = this.client.queues[qi].ring;
    const end = Date.now() + ms;
    for (;;) {
      const head = ring.popUsed();
      if (head >= 0) return { head, usedLen: ring.usedLen };
      const left = end - Date.now();
      if (left <= 0) return null;
      await this.client.waitAsync(Math.min(left, 50));
    }
  }

  /** Sends one chain and returns the answer (throws if none comes within `ms`). */
  async roundTrip(
    qi: number,
    head: number,
    status: GuestBuffer,
    ms = TIMEOUT_MS,
  ): Promise<RawResult> {
    this.submit(qi, head);
    const u = await this.nextUsed(qi, ms);
    if (u === null) throw new Error(`queue ${qi}: no used entry for head ${head} in ${ms} ms`);
    assert.equal(u.head, head, "used entry for another head");
    return { head, usedLen: u.usedLen, status: status.bytes[0] };
  }

  /** Whether the err eventfd of queue `qi` fires within `ms` (consumes it). */
  async errSignalled(qi: number, ms = TIMEOUT_MS): Promise<boolean> {
    let n = 0;
    await waitFor(() => (n = eventfdRead(this.errFds[qi])) > 0, ms);
    return n > 0;
  }

  /** The used idx the device published on queue `qi`. */
  usedIdx(qi: number): number {
    const u = this.client.queues[qi].ring.used.bytes;
    return new DataView(u.buffer, u.byteOffset, 4).getUint16(2, true);
  }

  /** Overwrites avail idx of queue `qi` (a driver bug or an attack). */
  setAvailIdx(qi: number, v: number): void {
    const a = this.client.queues[qi].ring.avail.bytes;
    Atomics.store(new Uint16Array(a.buffer, a.byteOffset, 2), 1, v & 0xffff);
  }

  /** Disconnects (best effort) and closes the err eventfds. */
  async close(): Promise<void> {
    await this.client.close();
    for (const fd of this.errFds) close(fd);
  }
}

/** A 4 KiB read through the client's slot 0 of queue `qi` must succeed. */
export async function assertReadWorks(c: VhostUserBlkClient, qi: number): Promise<void> {
  const st = await c.execute(qi, (q) => q.read(0, 0, 4096), TIMEOUT_MS);
  assert.equal(st, 0, `read on queue ${qi} failed with status ${st}`);
}

/** Reads [off, off+len) in `bs` requests on queue 0 and checks the verify pattern for `seed`. */
export async function assertPattern(
  c: VhostUserBlkClient,
  off: number,
  len: number,
  bs: number,
  seed: number,
): Promise<void> {
  for (let o = off; o < off + len; o += bs) {
    assert.equal(await c.execute(0, (q) => q.read(0, o, bs), TIMEOUT_MS), 0, `read at ${o}`);
    const d = c.queues[0].data(0);
    const w = new Uint32Array(d.buffer, d.byteOffset, bs / 4);
    for (let i = 0; i < w.length; i++) {
      if (w[i] !== patternWord(o + 4 * i, seed)) assert.fail(`mismatch at byte ${o + 4 * i}`);
    }
  }
}
