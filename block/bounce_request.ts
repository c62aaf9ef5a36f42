import type { MappedRegion } from "../sys/mod.ts";
import type { BlockCompletion } from "./block_driver.ts";
import type { FileRequestHost } from "./file_request_host.ts";
import { IoVector } from "./io_vector.ts";
import { LOCK_NO_ENTRY, type SerialisedRequest } from "./request_serialiser.ts";

const PHASE_COPY_WRITE = 0, PHASE_RMW = 1;

/**
 * One unaligned file-driver request staged through an aligned bounce buffer
 * (QEMU's bdrv_padding_rmw_read and friends). Reads read the covering
 * aligned span and copy out. Writes whose offset and length are aligned
 * (only the memory is not) copy in and write, locked like any write; other
 * writes are read-modify-write cycles over the covering aligned blocks,
 * locked as *serialising* (bdrv_make_request_serialising) so that no other
 * write-like request of the image, in any IOThread, overlaps those blocks
 * between the read and the write. Pooled per driver. Internal to block/.
 *
 * @example
 * ```ts
 * import { BounceRequest } from "./bounce_request.ts";
 * if (typeof BounceRequest !== "function") throw new Error("unreachable");
 * ```
 */
export class BounceRequest implements SerialisedRequest {
  offset = 0;
  qiov: IoVector | null = null;
  cb: BlockCompletion | null = null;
  lockLo = 0;
  lockHi = 0;
  serialising = false;
  lockEntry = LOCK_NO_ENTRY;
  #buf: MappedRegion | null = null;
  #locked = false;
  #phase = PHASE_COPY_WRITE;
  #reads = 0;
  #err = 0;
  readonly #host: FileRequestHost;
  readonly #recycle: (r: BounceRequest) => void;
  readonly #whole = new IoVector(1);
  readonly #head = new IoVector(1);
  readonly #tail = new IoVector(1);

  constructor(host: FileRequestHost, recycle: (r: BounceRequest) => void) {
    this.#host = host;
    this.#recycle = recycle;
  }

  /** The covering aligned span [lockLo, lockHi) and a bounce buffer for it. */
  #span(): void {
    const ra = this.#host.requestAlignment;
    this.lockLo = Math.floor(this.offset / ra) * ra;
    this.lockHi = Math.ceil((this.offset + this.qiov!.size) / ra) * ra;
    if (this.lockHi === this.lockLo) this.lockHi = this.lockLo + ra;
    this.#buf = this.#host.bounceGet(this.lockHi - this.lockLo);
    this.#whole.reset();
    this.#whole.add(this.#buf.addr, this.lockHi - this.lockLo);
  }

  /** Reads the covering span, then copies the requested bytes out. */
  startRead(): void {
    this.#span();
    const h = this.#host;
    h.engine.preadv(h.fd, this.#whole, this.lockLo, this.#readDone);
  }

  #readDone = (ret: number): void => {
    if (ret === 0) this.qiov!.copyFrom(this.#buf!.addr + (this.offset - this.lockLo));
    this.#finish(ret);
  };

  /** Locks, then copies and writes (aligned range) or reads, merges and writes. */
  startWrite(): void {
    this.#span();
    const ra = this.#host.requestAlignment;
    const rangeAligned = this.offset % ra === 0 && this.qiov!.size % ra === 0;
    this.#phase = rangeAligned ? PHASE_COPY_WRITE : PHASE_RMW;
    this.serialising = !rangeAligned;
    const ser = this.#host.serialiser;
    if (ser === null) return this.lockGranted();
    this.#locked = true;
    if (ser.begin(this)) this.lockGranted();
  }

  /** Runs the write once no conflicting request is in flight. */
  lockGranted(): void {
    if (this.#phase === PHASE_COPY_WRITE) {
      this.qiov!.copyTo(this.#buf!.addr);
      const h = this.#host;
      h.engine.pwritev(h.fd, this.#whole, this.lockLo, this.#writeDone);
    } else this.#rmwStart();
  }

  /** Reads the partially covered head and tail blocks, then merges and writes. */
  #rmwStart(): void {
    const h = this.#host, ra = h.requestAlignment, end = this.offset + this.qiov!.size;
    const readHead = this.offset !== this.lockLo;
    const readTail = end !== this.lockHi && (!readHead || this.lockHi - ra !== this.lockLo);
    this.#reads = (readHead ? 1 : 0) + (readTail ? 1 : 0);
    this.#err = 0;
    if (readHead) {
      this.#head.reset();
      this.#head.add(this.#buf!.addr, ra);
      h.engine.preadv(h.fd, this.#head, this.lockLo, this.#rmwReadDone);
    }
    if (readTail) {
      this.#tail.reset();
      this.#tail.add(this.#buf!.addr + (this.lockHi - ra - this.lockLo), ra);
      h.engine.preadv(h.fd, this.#tail, this.lockHi - ra, this.#rmwReadDone);
    }
  }

  #rmwReadDone = (ret: number): void => {
    if (ret < 0 && this.#err === 0) this.#err = ret;
    if (--this.#reads > 0) return;
    if (this.#err < 0) return this.#finish(this.#err);
    this.qiov!.copyTo(this.#buf!.addr + (this.offset - this.lockLo));
    const h = this.#host;
    h.engine.pwritev(h.fd, this.#whole, this.lockLo, this.#writeDone);
  };

  #writeDone = (ret: number): void => {
    this.#finish(ret);
  };

  /** Unlocks, returns the buffer, recycles this object, then completes. */
  #finish(ret: number): void {
    if (this.#locked) {
      this.#locked = false;
      this.#host.serialiser!.end(this);
    }
    if (this.#buf) this.#host.bouncePut(this.#buf);
    this.#buf = null;
    const cb = this.cb!;
    this.cb = null;
    this.qiov = null;
    this.#recycle(this);
    cb(ret);
  }
}
