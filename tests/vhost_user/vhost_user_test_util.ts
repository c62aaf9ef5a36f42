/**
 * Test helpers for the vhost-user server: an fd watcher driven by an epoll
 * loop (so these tests do not depend on aio/; vhost_user_aio_test.ts runs the
 * server on a real AioContext) and a stub backend that records every call and maps the memory
 * table like a real device would.
 *
 * @module
 */

import { close, Epoll, EPOLLIN, type MappedRegion, mmapShared } from "../../sys/mod.ts";
import type {
  FdWatcher,
  VhostUserBackend,
  VhostUserMemoryRegion,
  VhostUserVringAddr,
} from "../../vhost_user/mod.ts";

/** An FdWatcher whose handlers run from an async epoll loop on this thread. */
export class TestLoop implements FdWatcher {
  readonly #ep = new Epoll(16);
  readonly #handlers = new Map<number, { read?(): void }>();
  #running = true;
  readonly #done: Promise<void>;

  constructor() {
    this.#done = this.#run();
  }

  setFdHandler(fd: number, handler: { read?(): void } | null): void {
    if (handler) {
      if (!this.#handlers.has(fd)) this.#ep.add(fd, EPOLLIN);
      this.#handlers.set(fd, handler);
    } else if (this.#handlers.delete(fd)) {
      this.#ep.delete(fd);
    }
  }

  /** Watched fds (for assertions). */
  get watched(): number[] {
    return [...this.#handlers.keys()];
  }

  async #run(): Promise<void> {
    while (this.#running) {
      const n = await this.#ep.waitAsync(10);
      for (let i = 0; i < n; i++) this.#handlers.get(this.#ep.ready.fd(i))?.read?.();
    }
  }

  async stop(): Promise<void> {
    this.#running = false;
    await this.#done;
    this.#ep.close();
  }
}

const bit = (n: number) => 1n << BigInt(n);

/** A backend that records calls, maps the memory table and owns its eventfds. */
export class StubBackend implements VhostUserBackend {
  readonly calls: string[] = [];
  queues = 2;
  featureBits = bit(32) | bit(30) | bit(29) | bit(12) | bit(9) | bit(6);
  protocolBits = bit(0) | bit(3) | bit(9);
  config = new Uint8Array(60);
  maps: { region: VhostUserMemoryRegion; map: MappedRegion }[] = [];
  vringNum = new Map<number, number>();
  vringBase = new Map<number, number>();
  vringAddr = new Map<number, VhostUserVringAddr>();
  enabled = new Map<number, boolean>();
  kick = new Map<number, number | null>();
  call = new Map<number, number | null>();
  err = new Map<number, number | null>();
  resets = 0;
  failNext: Error | null = null;
  /** When set, getVringBase waits for it (a ring whose requests are still in flight). */
  vringBaseGate: Promise<void> | null = null;

  constructor() {
    new DataView(this.config.buffer).setBigUint64(0, 2048n, true); // capacity
    new DataView(this.config.buffer).setUint16(34, 2, true); // num_queues
  }

  #log(s: string): void {
    this.calls.push(s);
    if (this.failNext) {
      const e = this.failNext;
      this.failNext = null;
      throw e;
    }
  }

  features(): bigint {
    return this.featureBits;
  }
  protocolFeatures(): bigint {
    return this.protocolBits;
  }
  numQueues(): number {
    return this.queues;
  }
  setFeatures(f: bigint): void {
    this.#log(`setFeatures ${f.toString(16)}`);
  }
  setProtocolFeatures(f: bigint): void {
    this.#log(`setProtocolFeatures ${f.toString(16)}`);
  }
  getConfig(offset: number, size: number): Uint8Array {
    this.#log(`getConfig ${offset} ${size}`);
    return this.config.slice(offset, offset + size);
  }
  setConfig(offset: number, data: Uint8Array, flags: number): void {
    this.#log(`setConfig ${offset} ${data.length} ${flags}`);
  }
  setMemTable(regions: VhostUserMemoryRegion[]): void {
    this.#log(`setMemTable ${regions.length}`);
    const maps = regions.map((region) => ({
      region,
      map: mmapShared(region.fd, region.mmapOffset + region.size, 0),
    }));
    this.#unmap();
    this.maps = maps;
  }
  setVringNum(i: number, n: number): void {
    this.#log(`setVringNum ${i} ${n}`);
    this.vringNum.set(i, n);
  }
  setVringAddr(i: number, a: VhostUserVringAddr): void {
    this.#log(`setVringAddr ${i}`);
    this.vringAddr.set(i, a);
  }
  setVringBase(i: number, b: number): void {
    this.#log(`setVringBase ${i} ${b}`);
    this.vringBase.set(i, b);
  }
  async getVringBase(i: number): Promise<number> {
    this.#log(`getVringBase ${i}`);
    await (this.vringBaseGate ?? new Promise((r) => setTimeout(r, 5))); // "wait for in-flight requests"
    this.calls.push(`getVringBase ${i} done`);
    return this.vringBase.get(i) ?? 0;
  }
  #swap(m: Map<number, number | null>, i: number, fd: number | null): void {
    const old = m.get(i);
    if (old != null) close(old);
    m.set(i, fd);
  }
  setVringKick(i: number, fd: number | null): void {
    this.#swap(this.kick, i, fd);
    this.#log(`setVringKick ${i} ${fd === null ? "nofd" : "fd"}`);
  }
  setVringCall(i: number, fd: number | null): void {
    this.#swap(this.call, i, fd);
    this.#log(`setVringCall ${i} ${fd === null ? "nofd" : "fd"}`);
  }
  setVringErr(i: number, fd: number | null): void {
    this.#swap(this.err, i, fd);
    this.#log(`setVringErr ${i} ${fd === null ? "nofd" : "fd"}`);
  }
  setVringEnable(i: number, on: boolean): void {
    this.#log(`setVringEnable ${i} ${on}`);
    this.enabled.set(i, on);
  }
  #unmap(): void {
    for (const m of this.maps) m.map.unmap();
    this.maps = [];
  }
  reset(): void {
    this.resets++;
    this.calls.push("reset");
    this.#unmap();
    for (const m of [this.kick, this.call, this.err]) {
      for (const fd of m.values()) if (fd != null) close(fd);
      m.clear();
    }
    this.enabled.clear();
  }
}

/** Number of open fds of this process. */
export function openFdCount(): number {
  let n = 0;
  for (const _ of Deno.readDirSync("/proc/self/fd")) n++;
  return n;
}

/** Polls `cond` until true or `ms` pass. */
export async function until(cond: () => boolean, ms = 2000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("condition not reached in time");
    await new Promise((r) => setTimeout(r, 2));
  }
}
