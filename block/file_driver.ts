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
import { BounceRequest } from "./bounce_request.ts";
import type { FileRequestHost } from "./file_request_host.ts";
import { RangeLockTable } from "./range_lock_table.ts";
import { RequestSerialiser } from "./request_serialiser.ts";
import { TrackedWrite } from "./tracked_write.ts";

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
  /** Shared with the image's other drivers (other IOThreads); else a private one. */
  rangeLocks?: RangeLockTable;
}

const ZERO_CHUNK = 1 << 20;

/**
 * The `file` protocol driver (QEMU block/file-posix.c) for regular files and
 * block devices. Size from fstat or BLKGETSIZE64; under O_DIRECT the request
 * and buffer alignment come from statx(STATX_DIOALIGN), BLKSSZGET for block
 * devices, or a probe (512, else 4096). Unaligned requests are staged in an
 * aligned bounce buffer ({@link BounceRequest}): reads are copied back on
 * completion, writes with an unaligned offset or length are read-modify-write
 * cycles. Under O_DIRECT every write-like request (write, discard,
 * write-zeroes) is locked in a {@link RangeLockTable} shared with the image's
 * other drivers (one per IOThread), so a read-modify-write never overlaps
 * another write of the same blocks in any thread; while none is in flight an
 * aligned write pays a per-driver counter. Discard punches holes
 * (PUNCH_HOLE|KEEP_SIZE; on a block device only the whole blocks inside the
 * range, as QEMU drops a rejected unaligned head and tail); write-zeroes uses
 * ZERO_RANGE (or a hole when unmapping is allowed) on the aligned part and
 * writes the unaligned head and tail as zeroes (read-modify-write), and
 * remembers EOPNOTSUPP, falling back to writing zeroes. Flush is fdatasync.
 * All I/O goes through an {@link IoEngine}.
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
export class FileDriver implements BlockDriver, FileRequestHost {
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
  readonly #recycleBounce = (r: BounceRequest) => this.#pool.push(r);
  readonly #writes: TrackedWrite[] = [];
  readonly #recycleWrite = (w: TrackedWrite) => this.#writes.push(w);
  /** Locks write-like requests; null without O_DIRECT (no read-modify-write ever). */
  readonly serialiser: RequestSerialiser | null;
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
    this.serialiser = this.requestAlignment > 1
      ? new RequestSerialiser(ctx, opts.rangeLocks ?? RangeLockTable.create({ participants: 1 }))
      : null;
    if (opts.engine) {
      this.engine = opts.engine;
      this.#sharedEngine = null;
    } else {
      this.#sharedEngine = opts.aio ?? "threads";
      try {
        this.engine = acquireIoEngine(ctx, this.#sharedEngine);
      } catch (e) {
        this.serialiser?.close();
        throw e;
      }
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

  /**
   * Hot path when aligned: straight to the engine (locked under O_DIRECT,
   * a counter while no read-modify-write exists); otherwise via a bounce buffer.
   */
  pwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (!this.#aligned(offset, qiov)) return this.#req(offset, qiov, cb).startWrite();
    if (this.serialiser === null) return this.engine.pwritev(this.fd, qiov, offset, cb);
    const w = this.#writes.pop() ?? new TrackedWrite(this, this.#recycleWrite);
    w.write(offset, qiov, cb);
  }

  /** fdatasync through the engine. */
  flush(cb: BlockCompletion): void {
    this.engine.fdatasync(this.fd, cb);
  }

  /**
   * fallocate(PUNCH_HOLE|KEEP_SIZE); unsupported discard succeeds as a no-op.
   * A block device rejects a range that is not block-aligned, so only the
   * whole blocks inside it are discarded (discard is advisory).
   */
  pdiscard(offset: number, bytes: number, cb: BlockCompletion): void {
    const ra = this.requestAlignment;
    if (this.isBlockDevice && ra > 1) {
      const lo = Math.ceil(offset / ra) * ra, hi = Math.floor((offset + bytes) / ra) * ra;
      offset = lo;
      bytes = hi > lo ? hi - lo : 0;
    }
    if (!this.#hasPunchHole || bytes === 0) {
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
    const ra = this.requestAlignment;
    if (ra > 1 && (offset % ra !== 0 || bytes % ra !== 0)) {
      this.#zeroesUnaligned(offset, bytes, unmap, cb);
      return;
    }
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
    this.#fallocate(mode, offset, bytes, (ret) => {
      if (ret !== -EOPNOTSUPP) return cb(ret);
      this.#hasPunchHole = false;
      unsupported();
    });
  }

  /** fallocate through the engine, locked like a write under O_DIRECT. */
  #fallocate(mode: number, offset: number, bytes: number, cb: BlockCompletion): void {
    if (this.serialiser === null) return this.engine.fallocate(this.fd, mode, offset, bytes, cb);
    const w = this.#writes.pop() ?? new TrackedWrite(this, this.#recycleWrite);
    w.fallocate(mode, offset, bytes, cb);
  }

  /**
   * Write-zeroes of a range that is not aligned (QEMU's
   * bdrv_co_do_zero_pwritev): the whole blocks inside it as usual, the
   * partial head and tail as writes of zeroes (read-modify-write cycles,
   * serialised like any other); completes once all parts did, with the
   * first error.
   */
  #zeroesUnaligned(offset: number, bytes: number, unmap: boolean, cb: BlockCompletion): void {
    const ra = this.requestAlignment, end = offset + bytes;
    const lo = Math.ceil(offset / ra) * ra, hi = Math.floor(end / ra) * ra;
    const zero = this.#zeroBuf ??= mmapAnonymous(ZERO_CHUNK);
    let left = 0, err = 0;
    const one = (ret: number) => {
      if (ret < 0 && err === 0) err = ret;
      if (--left === 0) cb(err);
    };
    const writeZeroes = (pos: number, n: number) => {
      const q = new IoVector(1);
      q.add(zero.addr, n);
      this.pwritev(pos, q, one);
    };
    if (lo >= hi) {
      left = 1;
      writeZeroes(offset, bytes); // within one block, or two partial ones
      return;
    }
    left = (offset < lo ? 1 : 0) + 1 + (hi < end ? 1 : 0);
    if (offset < lo) writeZeroes(offset, lo - offset);
    this.pwriteZeroes(lo, hi - lo, unmap, one);
    if (hi < end) writeZeroes(hi, end - hi);
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
    this.serialiser?.close();
    this.#bounce.close();
    this.#zeroBuf?.unmap();
    close(this.fd);
  }

  #zeroRange(offset: number, bytes: number, cb: BlockCompletion): void {
    if (!this.#hasZeroRange) {
      this.#writeZeroes(offset, bytes, cb);
      return;
    }
    this.#fallocate(FALLOC_FL_ZERO_RANGE, offset, bytes, (ret) => {
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
    const r = this.#pool.pop() ?? new BounceRequest(this, this.#recycleBounce);
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

  /** @internal */
  bouncePut(buf: MappedRegion): void {
    this.#bounce.put(buf);
  }
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
