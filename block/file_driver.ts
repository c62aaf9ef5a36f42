import type { AioContext } from "../aio/mod.ts";
import {
  blkGetSize64,
  blkSszGet,
  close,
  EINVAL,
  EOPNOTSUPP,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fstat,
  type MappedRegion,
  mmapAnonymous,
  O_DIRECT,
  O_RDONLY,
  O_RDWR,
  open,
  pread,
  statx,
  SysError,
} from "../sys/mod.ts";
import { IoVector } from "./io_vector.ts";
import type { BlockCompletion, BlockDriver } from "./block_driver.ts";
import type { IoEngine, IoEngineKind } from "./io_engine.ts";
import { acquireIoEngine, releaseIoEngine } from "./io_engine_registry.ts";
import { BounceBufferPool } from "./bounce_buffer_pool.ts";

/**
 * Options of {@link FileDriver} (QEMU's file driver: filename, cache.direct,
 * aio, read-only, discard).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { FileDriverOptions } from "./file_driver.ts";
 * const o: FileDriverOptions = { filename: "disk.img", direct: true, aio: "io_uring" };
 * assert(o.direct);
 * ```
 */
export interface FileDriverOptions {
  /** Path of a regular file or block device. */
  filename: string;
  /** Open with O_DIRECT (cache=none). */
  direct?: boolean;
  /** Engine (default "threads"). */
  aio?: IoEngineKind;
  /** Open read-only. */
  readOnly?: boolean;
  /** Whether write-zeroes may deallocate (discard=unmap). */
  discardUnmap?: boolean;
  /** Use this engine instead of the context's shared one (tests, benchmarks). */
  engine?: IoEngine;
}

const ZERO_CHUNK = 1 << 20;

/**
 * The `file` protocol driver (QEMU block/file-posix.c) for regular files and
 * block devices. Size from fstat or BLKGETSIZE64; under O_DIRECT the request
 * and buffer alignment come from statx(STATX_DIOALIGN), BLKSSZGET for block
 * devices, or a probe (512, else 4096). Unaligned requests are staged in an
 * aligned bounce buffer: reads are copied back on completion, writes with an
 * unaligned offset or length are read-modify-write cycles serialised against
 * each other. Discard punches holes (PUNCH_HOLE|KEEP_SIZE); write-zeroes uses
 * ZERO_RANGE (or a hole when unmapping is allowed) and remembers EOPNOTSUPP,
 * falling back to writing zeroes. Flush is fdatasync. All I/O goes through an
 * {@link IoEngine}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { FileDriver } from "./file_driver.ts";
 * const path = Deno.makeTempFileSync();
 * Deno.truncateSync(path, 1 << 20);
 * const ctx = new AioContext();
 * const d = FileDriver.open(ctx, { filename: path, aio: "io_uring" });
 * assert.equal(d.length, 1 << 20);
 * assert.equal(d.requestAlignment, 1);
 * await d.close();
 * ctx.close();
 * ```
 */
export class FileDriver implements BlockDriver {
  /** Always "file". */
  readonly name = "file";
  /** Offset/length alignment (1 without O_DIRECT). */
  readonly requestAlignment: number;
  /** Buffer alignment (1 without O_DIRECT). */
  readonly memAlignment: number;
  /** The open file descriptor. */
  readonly fd: number;
  /** The engine doing the I/O. */
  readonly engine: IoEngine;
  /** Whether the file is a block device. */
  readonly isBlockDevice: boolean;
  readonly #ctx: AioContext;
  readonly #sharedEngine: IoEngineKind | null;
  readonly #discardUnmap: boolean;
  readonly #bounce = new BounceBufferPool();
  readonly #pool: BounceRequest[] = [];
  /** Read-modify-write requests in progress (serialised on overlap). */
  readonly #rmwActive: BounceRequest[] = [];
  readonly #rmwWaiting: BounceRequest[] = [];
  #length: number;
  #hasPunchHole = true;
  #hasZeroRange = true;
  #zeroBuf: MappedRegion | null = null;
  /** Bounce requests started, for tests. */
  bounced = 0;

  private constructor(ctx: AioContext, opts: FileDriverOptions, fd: number) {
    this.#ctx = ctx;
    this.fd = fd;
    this.#discardUnmap = opts.discardUnmap ?? false;
    const st = fstat(fd);
    this.isBlockDevice = st.isBlockDevice;
    this.#length = st.isBlockDevice ? blkGetSize64(fd) : st.size;
    if (opts.direct) {
      const [ra, ma] = probeAlignment(fd, st.isBlockDevice);
      this.requestAlignment = ra;
      this.memAlignment = ma;
    } else {
      this.requestAlignment = 1;
      this.memAlignment = 1;
    }
    if (opts.engine) {
      this.engine = opts.engine;
      this.#sharedEngine = null;
    } else {
      this.#sharedEngine = opts.aio ?? "threads";
      this.engine = acquireIoEngine(ctx, this.#sharedEngine);
    }
  }

  /** Opens `opts.filename` (O_RDWR or O_RDONLY, plus O_DIRECT when asked). */
  static open(ctx: AioContext, opts: FileDriverOptions): FileDriver {
    const fd = open(
      opts.filename,
      (opts.readOnly ? O_RDONLY : O_RDWR) | (opts.direct ? O_DIRECT : 0),
    );
    try {
      return new FileDriver(ctx, opts, fd);
    } catch (e) {
      close(fd);
      throw e;
    }
  }

  /** Size in bytes. */
  get length(): number {
    return this.#length;
  }

  /** Re-reads the size. */
  refreshLength(): number {
    const st = fstat(this.fd);
    this.#length = st.isBlockDevice ? blkGetSize64(this.fd) : st.size;
    return this.#length;
  }

  /** Hot path when aligned: straight to the engine; otherwise via a bounce buffer. */
  preadv(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.#aligned(offset, qiov)) this.engine.preadv(this.fd, qiov, offset, cb);
    else this.#req(offset, qiov, cb).startRead();
  }

  /** Hot path when aligned: straight to the engine; otherwise via a bounce buffer. */
  pwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.#aligned(offset, qiov)) this.engine.pwritev(this.fd, qiov, offset, cb);
    else this.#req(offset, qiov, cb).startWrite();
  }

  /** fdatasync through the engine. */
  flush(cb: BlockCompletion): void {
    this.engine.fdatasync(this.fd, cb);
  }

  /** fallocate(PUNCH_HOLE|KEEP_SIZE); unsupported discard succeeds as a no-op. */
  pdiscard(offset: number, bytes: number, cb: BlockCompletion): void {
    if (!this.#hasPunchHole) {
      this.#ctx.scheduleOneshot(() => cb(0));
      return;
    }
    this.#punchHole(offset, bytes, cb, () => cb(0));
  }

  /**
   * Punches a hole when `unmap` is allowed (discard=unmap), else
   * fallocate(ZERO_RANGE); on EOPNOTSUPP (remembered) writes zeroes.
   */
  pwriteZeroes(offset: number, bytes: number, unmap: boolean, cb: BlockCompletion): void {
    if (unmap && this.#discardUnmap && this.#hasPunchHole && !this.isBlockDevice) {
      this.#punchHole(offset, bytes, cb, () => this.#zeroRange(offset, bytes, cb));
      return;
    }
    this.#zeroRange(offset, bytes, cb);
  }

  /**
   * fallocate(PUNCH_HOLE|KEEP_SIZE); on EOPNOTSUPP remembers that the file
   * cannot and runs `unsupported` instead of completing.
   */
  #punchHole(offset: number, bytes: number, cb: BlockCompletion, unsupported: () => void): void {
    const mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    this.engine.fallocate(this.fd, mode, offset, bytes, (ret) => {
      if (ret !== -EOPNOTSUPP) return cb(ret);
      this.#hasPunchHole = false;
      unsupported();
    });
  }

  /** Forwards to the engine. */
  ioPlug(): void {
    this.engine.plug();
  }

  /** Forwards to the engine. */
  ioUnplug(): void {
    this.engine.unplug();
  }

  /** Releases the engine reference, bounce buffers and the fd. */
  async close(): Promise<void> {
    if (this.#sharedEngine) await releaseIoEngine(this.#ctx, this.#sharedEngine);
    this.#bounce.close();
    this.#zeroBuf?.unmap();
    close(this.fd);
  }

  #zeroRange(offset: number, bytes: number, cb: BlockCompletion): void {
    if (!this.#hasZeroRange) {
      this.#writeZeroes(offset, bytes, cb);
      return;
    }
    this.engine.fallocate(this.fd, FALLOC_FL_ZERO_RANGE, offset, bytes, (ret) => {
      if (ret !== -EOPNOTSUPP) return cb(ret);
      this.#hasZeroRange = false;
      this.#writeZeroes(offset, bytes, cb);
    });
  }

  /** Writes zeroes from a shared aligned zero buffer, one chunk at a time. */
  #writeZeroes(offset: number, bytes: number, cb: BlockCompletion): void {
    const zero = this.#zeroBuf ??= mmapAnonymous(ZERO_CHUNK);
    const q = new IoVector(1);
    const step = (pos: number): void => {
      const n = Math.min(ZERO_CHUNK, offset + bytes - pos);
      q.reset();
      q.add(zero.addr, n);
      this.pwritev(pos, q, (ret) => {
        if (ret < 0 || pos + n >= offset + bytes) cb(ret);
        else step(pos + n);
      });
    };
    step(offset);
  }

  #aligned(offset: number, qiov: IoVector): boolean {
    const ra = this.requestAlignment;
    if (ra === 1 && this.memAlignment === 1) return true;
    return offset % ra === 0 && qiov.size % ra === 0 &&
      qiov.isAligned(this.memAlignment, this.memAlignment);
  }

  #req(offset: number, qiov: IoVector, cb: BlockCompletion): BounceRequest {
    const r = this.#pool.pop() ?? new BounceRequest(this);
    r.offset = offset;
    r.qiov = qiov;
    r.cb = cb;
    this.bounced++;
    return r;
  }

  /** @internal */
  bounceGet(len: number): MappedRegion {
    return this.#bounce.get(len);
  }

  /** @internal Finishes a bounce request and recycles it. */
  bounceDone(r: BounceRequest, ret: number): void {
    if (r.buf) this.#bounce.put(r.buf);
    r.buf = null;
    const cb = r.cb!;
    r.cb = null;
    r.qiov = null;
    if (r.rmw) {
      r.rmw = false;
      this.#rmwActive.splice(this.#rmwActive.indexOf(r), 1);
      this.#pool.push(r);
      // Start waiters that no longer overlap anything active.
      for (let i = 0; i < this.#rmwWaiting.length;) {
        const w = this.#rmwWaiting[i];
        if (this.#rmwOverlaps(w)) i++;
        else {
          this.#rmwWaiting.splice(i, 1);
          this.#rmwActive.push(w);
          w.rmwStart();
        }
      }
    } else this.#pool.push(r);
    cb(ret);
  }

  /** @internal Registers an RMW write; starts it unless it overlaps one in progress. */
  rmwBegin(r: BounceRequest): void {
    r.rmw = true;
    if (this.#rmwOverlaps(r)) this.#rmwWaiting.push(r);
    else {
      this.#rmwActive.push(r);
      r.rmwStart();
    }
  }

  #rmwOverlaps(r: BounceRequest): boolean {
    for (const a of this.#rmwActive) if (a.alo < r.ahi && r.alo < a.ahi) return true;
    return false;
  }
}

/** One unaligned request staged through a bounce buffer (pooled per driver). */
class BounceRequest {
  offset = 0;
  qiov: IoVector | null = null;
  cb: BlockCompletion | null = null;
  buf: MappedRegion | null = null;
  alo = 0;
  ahi = 0;
  rmw = false;
  #reads = 0;
  #err = 0;
  readonly #drv: FileDriver;
  readonly #whole = new IoVector(1);
  readonly #head = new IoVector(1);
  readonly #tail = new IoVector(1);

  constructor(drv: FileDriver) {
    this.#drv = drv;
  }

  #span(): void {
    const ra = this.#drv.requestAlignment;
    this.alo = Math.floor(this.offset / ra) * ra;
    this.ahi = Math.ceil((this.offset + this.qiov!.size) / ra) * ra;
    if (this.ahi === this.alo) this.ahi = this.alo + ra;
    this.buf = this.#drv.bounceGet(this.ahi - this.alo);
    this.#whole.reset();
    this.#whole.add(this.buf.addr, this.ahi - this.alo);
  }

  startRead(): void {
    this.#span();
    this.#drv.engine.preadv(this.#drv.fd, this.#whole, this.alo, this.#readDone);
  }

  #readDone = (ret: number): void => {
    if (ret === 0) this.qiov!.copyFrom(this.buf!.addr + (this.offset - this.alo));
    this.#drv.bounceDone(this, ret);
  };

  startWrite(): void {
    this.#span();
    const ra = this.#drv.requestAlignment;
    if (this.offset % ra === 0 && this.qiov!.size % ra === 0) {
      // Only the memory is misaligned: copy and write.
      this.qiov!.copyTo(this.buf!.addr);
      this.#drv.engine.pwritev(this.#drv.fd, this.#whole, this.alo, this.#writeDone);
    } else this.#drv.rmwBegin(this);
  }

  /** Reads the partially covered head and tail blocks, then merges and writes. */
  rmwStart(): void {
    const ra = this.#drv.requestAlignment, end = this.offset + this.qiov!.size;
    const readHead = this.offset !== this.alo;
    const readTail = end !== this.ahi && (!readHead || this.ahi - ra !== this.alo);
    this.#reads = (readHead ? 1 : 0) + (readTail ? 1 : 0);
    this.#err = 0;
    if (readHead) {
      this.#head.reset();
      this.#head.add(this.buf!.addr, ra);
      this.#drv.engine.preadv(this.#drv.fd, this.#head, this.alo, this.#rmwReadDone);
    }
    if (readTail) {
      this.#tail.reset();
      this.#tail.add(this.buf!.addr + (this.ahi - ra - this.alo), ra);
      this.#drv.engine.preadv(this.#drv.fd, this.#tail, this.ahi - ra, this.#rmwReadDone);
    }
  }

  #rmwReadDone = (ret: number): void => {
    if (ret < 0 && this.#err === 0) this.#err = ret;
    if (--this.#reads > 0) return;
    if (this.#err < 0) return this.#drv.bounceDone(this, this.#err);
    this.qiov!.copyTo(this.buf!.addr + (this.offset - this.alo));
    this.#drv.engine.pwritev(this.#drv.fd, this.#whole, this.alo, this.#writeDone);
  };

  #writeDone = (ret: number): void => {
    this.#drv.bounceDone(this, ret);
  };
}

/**
 * O_DIRECT alignment of an open fd: [offset/length alignment, memory
 * alignment]. statx(STATX_DIOALIGN) first, then BLKSSZGET for block devices,
 * then a probe read of 512 bytes (else 4096) into a page-aligned buffer.
 */
function probeAlignment(fd: number, isBlockDevice: boolean): [number, number] {
  try {
    const st = statx(fd);
    if (st.dioOffsetAlign > 0) return [st.dioOffsetAlign, Math.max(st.dioMemAlign, 1)];
  } catch (e) {
    if (!(e instanceof SysError)) throw e;
  }
  if (isBlockDevice) {
    const ssz = blkSszGet(fd);
    return [ssz, ssz];
  }
  const buf = mmapAnonymous(4096);
  try {
    pread(fd, new Uint8Array(buf.buffer, 0, 512), 0);
    return [512, 4096];
  } catch (e) {
    if (e instanceof SysError && e.errno === EINVAL) return [4096, 4096];
    throw e;
  } finally {
    buf.unmap();
  }
}
