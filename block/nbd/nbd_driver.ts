import type { AioContext } from "../../aio/mod.ts";
import { EROFS, type MappedRegion, mmapAnonymous } from "../../sys/mod.ts";
import { IoVector } from "../io_vector.ts";
import type { BlockCompletion, BlockDriver } from "../block_driver.ts";
import { NbdClient, type NbdClientOptions } from "./nbd_client.ts";
import { sliceQiov } from "./qiov_range.ts";
import {
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from "./nbd_protocol.ts";

/** Largest TRIM / WRITE_ZEROES range sent in one request (lengths are 32-bit). */
const MAX_ZERO_REQUEST = 1 << 30;
const ZERO_CHUNK = 1 << 20;

/**
 * The `nbd` protocol driver (QEMU's block/nbd.c): a {@link BlockDriver}
 * over an {@link NbdClient}. Size, read-only and the block size limits come
 * from the server; requests larger than the server's maximum block size are
 * split; flush, trim and write-zeroes go out only when the server
 * advertises them (otherwise flush and trim succeed as no-ops and
 * write-zeroes writes zeroes); write-zeroes without unmap carries
 * NBD_CMD_FLAG_NO_HOLE; `fua` writes carry NBD_CMD_FLAG_FUA when the server
 * takes it, else are followed by a flush. Writes to a read-only export fail
 * with EROFS.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { NbdDriver } from "./nbd_driver.ts";
 * const ctx = new AioContext();
 * const dir = Deno.makeTempDirSync();
 * // No server there: the open fails (ENOENT) before any request.
 * await assert.rejects(NbdDriver.open(ctx, { server: { type: "unix", path: `${dir}/s` } }));
 * ctx.close();
 * Deno.removeSync(dir);
 * ```
 */
export class NbdDriver implements BlockDriver {
  /** Always "nbd". */
  readonly name = "nbd";
  /** The server's minimum block size. */
  readonly requestAlignment: number;
  /** Any buffer address works for a socket. */
  readonly memAlignment = 1;
  /** The connection. */
  readonly client: NbdClient;
  readonly #ctx: AioContext;
  readonly #maxBlock: number;
  #zeroBuf: MappedRegion | null = null;

  private constructor(ctx: AioContext, client: NbdClient) {
    this.#ctx = ctx;
    this.client = client;
    this.requestAlignment = client.info.minBlock;
    this.#maxBlock = client.info.maxBlock;
  }

  /** Connects and negotiates (poll the context until this settles). */
  static async open(ctx: AioContext, opts: NbdClientOptions): Promise<NbdDriver> {
    return new NbdDriver(ctx, await NbdClient.connect(ctx, opts));
  }

  /** The export's size. */
  get length(): number {
    return this.client.info.size;
  }

  /**
   * Whether the server allows several connections to one export
   * (NBD_FLAG_CAN_MULTI_CONN): a flush on one connection then covers the
   * writes completed on all of them. Each IOThread opens its own connection.
   */
  get canMultiConn(): boolean {
    return (this.client.info.flags & NBD_FLAG_CAN_MULTI_CONN) !== 0;
  }

  /** Whether the server exports read-only. */
  get readOnly(): boolean {
    return this.client.readOnly;
  }

  /** NBD_CMD_READ, split at the maximum block size. Hot path. */
  preadv(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    this.#rw(NBD_CMD_READ, 0, offset, qiov, cb);
  }

  /** NBD_CMD_WRITE, split at the maximum block size. Hot path. */
  pwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    this.pwritevFlags(offset, qiov, false, cb);
  }

  /** A write that is durable when it completes (NBD_CMD_FLAG_FUA, else write + flush). */
  pwritevFlags(offset: number, qiov: IoVector, fua: boolean, cb: BlockCompletion): void {
    if (this.readOnly) return this.#later(cb, -EROFS);
    const hasFua = (this.client.info.flags & NBD_FLAG_SEND_FUA) !== 0;
    if (fua && !hasFua) {
      return this.#rw(NBD_CMD_WRITE, 0, offset, qiov, (ret) => {
        if (ret < 0) cb(ret);
        else this.flush(cb);
      });
    }
    this.#rw(NBD_CMD_WRITE, fua ? NBD_CMD_FLAG_FUA : 0, offset, qiov, cb);
  }

  /** NBD_CMD_FLUSH when the server takes it; else nothing to do. */
  flush(cb: BlockCompletion): void {
    if (!(this.client.info.flags & NBD_FLAG_SEND_FLUSH)) return this.#later(cb, 0);
    this.client.submit(NBD_CMD_FLUSH, 0, 0, 0, null, cb);
  }

  /** NBD_CMD_TRIM when the server takes it (discard is advisory). */
  pdiscard(offset: number, bytes: number, cb: BlockCompletion): void {
    if (this.readOnly) return this.#later(cb, -EROFS);
    if (!(this.client.info.flags & NBD_FLAG_SEND_TRIM) || bytes === 0) {
      return this.#later(cb, 0);
    }
    this.#ranges(NBD_CMD_TRIM, 0, offset, bytes, cb);
  }

  /** NBD_CMD_WRITE_ZEROES (NO_HOLE unless `unmap`), else writes of zeroes. */
  pwriteZeroes(offset: number, bytes: number, unmap: boolean, cb: BlockCompletion): void {
    if (this.readOnly) return this.#later(cb, -EROFS);
    if (bytes === 0) return this.#later(cb, 0);
    if (this.client.info.flags & NBD_FLAG_SEND_WRITE_ZEROES) {
      this.#ranges(NBD_CMD_WRITE_ZEROES, unmap ? 0 : NBD_CMD_FLAG_NO_HOLE, offset, bytes, cb);
      return;
    }
    const zero = this.#zeroBuf ??= mmapAnonymous(ZERO_CHUNK);
    const step = Math.min(ZERO_CHUNK, this.#maxBlock);
    const next = (pos: number): void => {
      const n = Math.min(step, offset + bytes - pos);
      const q = new IoVector(1);
      q.add(zero.addr, n);
      this.pwritev(pos, q, (ret) => {
        if (ret < 0 || pos + n >= offset + bytes) cb(ret);
        else next(pos + n);
      });
    };
    next(offset);
  }

  /** Forwards to the client: requests of a batch leave in one sendmsg. */
  ioPlug(): void {
    this.client.plug();
  }

  /** Forwards to the client. */
  ioUnplug(): void {
    this.client.unplug();
  }

  /** The size cannot change under an NBD client: the negotiated one. */
  refreshLength(): number {
    return this.length;
  }

  /** Disconnects. */
  async close(): Promise<void> {
    await this.client.close();
    this.#zeroBuf?.unmap();
    this.#zeroBuf = null;
  }

  #later(cb: BlockCompletion, ret: number): void {
    this.#ctx.scheduleOneshot(() => cb(ret));
  }

  /** Read or write; pieces of at most the maximum block size, first error wins. */
  #rw(type: number, flags: number, offset: number, qiov: IoVector, cb: BlockCompletion): void {
    const size = qiov.size, max = this.#maxBlock;
    if (size <= max) return this.client.submit(type, flags, offset, size, qiov, cb);
    let left = Math.ceil(size / max), err = 0;
    const one = (ret: number) => {
      if (ret < 0 && err === 0) err = ret;
      if (--left === 0) cb(err);
    };
    this.client.plug();
    for (let pos = 0; pos < size; pos += max) {
      const n = Math.min(max, size - pos);
      this.client.submit(type, flags, offset + pos, n, sliceQiov(qiov, pos, n), one);
    }
    this.client.unplug();
  }

  /** Payload-less range commands in pieces of at most 1 GiB. */
  #ranges(type: number, flags: number, offset: number, bytes: number, cb: BlockCompletion): void {
    let left = Math.ceil(bytes / MAX_ZERO_REQUEST), err = 0;
    const one = (ret: number) => {
      if (ret < 0 && err === 0) err = ret;
      if (--left === 0) cb(err);
    };
    for (let pos = 0; pos < bytes; pos += MAX_ZERO_REQUEST) {
      const n = Math.min(MAX_ZERO_REQUEST, bytes - pos);
      this.client.submit(type, flags, offset + pos, n, null, one);
    }
  }
}
