/**
 * Shared by bench/block_bench.ts and bench/block_fio.ts: a random 4 KiB
 * read or write workload at a fixed queue depth against a BlockBackend,
 * driven the way an IOThread drives it (callbacks, resubmission from the
 * completion, `ctx.poll(true)`), and the 256 MiB benchmark image.
 */
import { AioContext } from "../aio/mod.ts";
import { BlockBackend, type BlockOptions, IoVector } from "../block/mod.ts";
import {
  close,
  fallocate,
  fsFilesystemType,
  fstat,
  mmapAnonymous,
  O_CREAT,
  O_RDWR,
  open,
  pwriteAt,
  TMPFS_MAGIC,
} from "../sys/mod.ts";

/** Size of the benchmark image. */
export const IMAGE_SIZE = 256 << 20;

/** A non-tmpfs directory for the image (O_DIRECT). */
export function benchDir(): string {
  for (const d of ["/work/main/.cache/tmp", "/var/tmp", "/tmp"]) {
    try {
      Deno.mkdirSync(d, { recursive: true });
      if (fsFilesystemType(d) !== TMPFS_MAGIC) return d;
    } catch {
      continue;
    }
  }
  throw new Error("no non-tmpfs directory for the benchmark image");
}

/** The 256 MiB image, written once with data (so reads hit real extents) and reused. */
export function benchImage(): string {
  const path = `${benchDir()}/block-bench-256m.img`;
  const fd = open(path, O_RDWR | O_CREAT, 0o644);
  try {
    if (fstat(fd).size !== IMAGE_SIZE || fstat(fd).blocks * 512 < IMAGE_SIZE) {
      fallocate(fd, 0, 0, IMAGE_SIZE);
      const chunk = mmapAnonymous(4 << 20);
      const b = chunk.bytes;
      for (let i = 0; i < b.length; i += 4096) b[i] = (i >> 12) & 0xff;
      for (let off = 0; off < IMAGE_SIZE; off += chunk.length) {
        pwriteAt(fd, chunk.addr, chunk.length, off);
      }
      chunk.unmap();
    }
  } finally {
    close(fd);
  }
  return path;
}

/** One open backend and the memory for a workload. */
export interface Target {
  ctx: AioContext;
  blk: BlockBackend;
  close(): Promise<void>;
}

/** Opens `opts` in a fresh AioContext (busy polling as an IOThread would). */
export async function openTarget(opts: BlockOptions, pollMaxNs = 32768): Promise<Target> {
  const ctx = new AioContext({ pollMaxNs });
  // qcow2 reads its metadata while opening: poll until the open settles.
  const opening = BlockBackend.open(ctx, opts);
  let opened = false;
  opening.then(() => opened = true, () => opened = true).finally(() => ctx.notify());
  while (!opened) await ctx.pollAsync();
  const blk = await opening;
  return {
    ctx,
    blk,
    async close() {
      const p = blk.close();
      let done = false;
      p.finally(() => {
        done = true;
        ctx.notify();
      });
      while (!done) await ctx.pollAsync();
      await p;
      ctx.close();
    },
  };
}

/**
 * A reusable random-I/O generator at queue depth `qd`: `run(ios)` performs
 * `ios` requests of `bs` bytes at random aligned offsets and returns the
 * elapsed nanoseconds. Allocation-free after construction.
 */
export class RandomIo {
  readonly #t: Target;
  readonly #qd: number;
  readonly #write: boolean;
  readonly #bs: number;
  readonly #blocks: number;
  readonly #qiovs: IoVector[] = [];
  readonly #cbs: ((ret: number) => void)[] = [];
  readonly #mem;
  #seed = 0x12345678;
  #target = 0;
  #submitted = 0;
  #completed = 0;
  #errors = 0;

  constructor(t: Target, qd: number, write: boolean, bs = 4096) {
    this.#t = t;
    this.#qd = qd;
    this.#write = write;
    this.#bs = bs;
    this.#blocks = Math.floor(t.blk.length / bs);
    this.#mem = mmapAnonymous(qd * bs);
    for (let i = 0; i < qd; i++) {
      const q = new IoVector(1);
      q.add(this.#mem.addr + i * bs, bs);
      this.#qiovs.push(q);
      this.#cbs.push((ret: number) => {
        this.#completed++;
        if (ret < 0) this.#errors++;
        if (this.#submitted < this.#target) this.#submit(i);
      });
    }
  }

  /** Requests that failed so far. */
  get errors(): number {
    return this.#errors;
  }

  #rand(): number {
    let x = this.#seed;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#seed = x >>> 0;
    return this.#seed;
  }

  #submit(i: number): void {
    this.#submitted++;
    const off = (this.#rand() % this.#blocks) * this.#bs;
    if (this.#write) this.#t.blk.aioPwritev(off, this.#qiovs[i], this.#cbs[i]);
    else this.#t.blk.aioPreadv(off, this.#qiovs[i], this.#cbs[i]);
  }

  /** Runs `ios` requests; returns elapsed ns. */
  run(ios: number): number {
    const { ctx, blk } = this.#t;
    this.#target = ios;
    this.#submitted = 0;
    this.#completed = 0;
    const t0 = performance.now();
    blk.ioPlug();
    for (let i = 0; i < this.#qd && i < ios; i++) this.#submit(i);
    blk.ioUnplug();
    while (this.#completed < ios) ctx.poll(true);
    return (performance.now() - t0) * 1e6;
  }

  /** Like {@link run} but keeps the Deno event loop alive (Worker start-up). */
  async warmUp(ios: number): Promise<void> {
    const { ctx, blk } = this.#t;
    this.#target = ios;
    this.#submitted = 0;
    this.#completed = 0;
    blk.ioPlug();
    for (let i = 0; i < this.#qd && i < ios; i++) this.#submit(i);
    blk.ioUnplug();
    while (this.#completed < ios) await ctx.pollAsync();
  }

  /** Unmaps the buffers. */
  close(): void {
    this.#mem.unmap();
  }
}

/** Runs the workload for about `seconds`; returns IOPS. */
export async function measureIops(
  opts: BlockOptions,
  qd: number,
  write: boolean,
  seconds: number,
): Promise<number> {
  const t = await openTarget(opts);
  const w = new RandomIo(t, qd, write);
  await w.warmUp(qd * 64);
  let ios = 0, ns = 0;
  const chunk = qd * 256;
  while (ns < seconds * 1e9) {
    ns += w.run(chunk);
    ios += chunk;
  }
  if (w.errors) throw new Error(`${w.errors} requests failed`);
  w.close();
  await t.close();
  return ios / (ns / 1e9);
}
