import type { BlockCompletion } from "./block_driver.ts";
import type { FileRequestHost } from "./file_request_host.ts";
import type { IoVector } from "./io_vector.ts";
import { LOCK_NO_ENTRY, type SerialisedRequest } from "./request_serialiser.ts";

const OP_WRITE = 0, OP_FALLOCATE = 1;

/**
 * An aligned write or an fallocate (discard, write-zeroes) of the file
 * driver, locked against read-modify-writes of the same image in any
 * IOThread (QEMU's tracked request around bdrv_driver_pwritev). Pooled by
 * the driver: hot path, no allocation; while no read-modify-write exists
 * the lock is a per-driver counter. Internal to block/.
 *
 * @example
 * ```ts
 * import { TrackedWrite } from "./tracked_write.ts";
 * if (typeof TrackedWrite !== "function") throw new Error("unreachable");
 * ```
 */
export class TrackedWrite implements SerialisedRequest {
  lockLo = 0;
  lockHi = 0;
  readonly serialising = false;
  lockEntry = LOCK_NO_ENTRY;
  #op = OP_WRITE;
  #offset = 0;
  #qiov: IoVector | null = null;
  #mode = 0;
  #bytes = 0;
  #cb: BlockCompletion | null = null;
  readonly #host: FileRequestHost;
  readonly #release: (w: TrackedWrite) => void;
  readonly #done: BlockCompletion;

  constructor(host: FileRequestHost, release: (w: TrackedWrite) => void) {
    this.#host = host;
    this.#release = release;
    this.#done = (ret) => {
      this.#host.serialiser!.end(this);
      const cb = this.#cb!;
      this.#cb = null;
      this.#qiov = null;
      this.#release(this);
      cb(ret);
    };
  }

  /** pwritev of an aligned request once its range is free. Hot path. */
  write(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    this.#op = OP_WRITE;
    this.#offset = offset;
    this.#qiov = qiov;
    this.#cb = cb;
    this.lockLo = offset;
    this.lockHi = offset + qiov.size;
    if (this.#host.serialiser!.begin(this)) this.lockGranted();
  }

  /** fallocate(mode) of a range once it is free. */
  fallocate(mode: number, offset: number, bytes: number, cb: BlockCompletion): void {
    this.#op = OP_FALLOCATE;
    this.#mode = mode;
    this.#offset = offset;
    this.#bytes = bytes;
    this.#cb = cb;
    this.lockLo = offset;
    this.lockHi = offset + bytes;
    if (this.#host.serialiser!.begin(this)) this.lockGranted();
  }

  /** Submits to the engine (now, or when a conflicting request released). */
  lockGranted(): void {
    const h = this.#host;
    if (this.#op === OP_WRITE) h.engine.pwritev(h.fd, this.#qiov!, this.#offset, this.#done);
    else h.engine.fallocate(h.fd, this.#mode, this.#offset, this.#bytes, this.#done);
  }
}
