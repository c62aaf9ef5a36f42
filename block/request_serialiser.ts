import { type AioContext, EventNotifier } from "../aio/mod.ts";
import type { RangeLockTable } from "./range_lock_table.ts";

/** `lockEntry` of a request running on the fast path (counted, not entered). */
export const LOCK_FAST = -2;
/** `lockEntry` of a request queued before it could get a table entry (table full). */
export const LOCK_NO_ENTRY = -1;

/**
 * A write-like request as the {@link RequestSerialiser} sees it (QEMU's
 * BdrvTrackedRequest): the bytes it may modify, whether it is serialising
 * (a read-modify-write: its span is whole aligned blocks), and what to run
 * once it may go. Implemented by the file driver's pooled request objects,
 * so locking allocates nothing.
 *
 * @example
 * ```ts
 * import type { SerialisedRequest } from "./request_serialiser.ts";
 * const r: SerialisedRequest = {
 *   lockLo: 0, lockHi: 4096, serialising: true, lockEntry: -1, lockGranted: () => {},
 * };
 * if (r.lockHi - r.lockLo !== 4096) throw new Error("one block");
 * ```
 */
export interface SerialisedRequest {
  /** First byte of the range. */
  lockLo: number;
  /** End of the range (exclusive). */
  lockHi: number;
  /** Excludes every overlapping write-like request, not only serialising ones. */
  serialising: boolean;
  /** Owned by the serialiser: table entry, {@link LOCK_FAST} or {@link LOCK_NO_ENTRY}. */
  lockEntry: number;
  /** Called from the serialiser's notifier once a queued request may run. */
  lockGranted(): void;
}

/**
 * One driver's side of a {@link RangeLockTable} (QEMU's
 * bdrv_wait_serialising_requests without coroutines): write-like requests
 * call {@link begin} before touching the image and {@link end} when the
 * engine completed them. A request that conflicts is queued, never waited
 * for: the driver's event loop keeps running, and when an owner in any
 * thread releases, this serialiser's eventfd (registered on the driver's
 * AioContext) is written and the queue is retried in order.
 *
 * Non-serialising requests cost two atomics at begin and one or two at end
 * while no read-modify-write exists anywhere on the image.
 *
 * @example
 * ```ts
 * import { AioContext } from "../aio/mod.ts";
 * import { RangeLockTable } from "./range_lock_table.ts";
 * import { RequestSerialiser, type SerialisedRequest } from "./request_serialiser.ts";
 * const ctx = new AioContext();
 * const table = RangeLockTable.create();
 * const a = new RequestSerialiser(ctx, table), b = new RequestSerialiser(ctx, table);
 * const req = (lo: number, hi: number, serialising: boolean): SerialisedRequest & { ran: boolean } => {
 *   const r = { lockLo: lo, lockHi: hi, serialising, lockEntry: -1, ran: false,
 *     lockGranted: () => { r.ran = true; } };
 *   return r;
 * };
 * const rmw = req(0, 4096, true), w = req(512, 1024, false);
 * if (!a.begin(rmw)) throw new Error("nothing conflicts");
 * if (b.begin(w)) throw new Error("overlaps the read-modify-write: queued");
 * a.end(rmw);
 * ctx.poll(true); // b's notifier fires: w is granted
 * if (!w.ran) throw new Error("resumed after the release");
 * b.end(w);
 * a.close(); b.close(); ctx.close();
 * ```
 */
export class RequestSerialiser {
  readonly #ctx: AioContext;
  readonly #table: RangeLockTable;
  readonly #notifier = new EventNotifier();
  readonly #participant: number;
  /** Requests waiting for a grant, oldest first. */
  readonly #queue: SerialisedRequest[] = [];
  #closed = false;
  /** Requests that had to wait (tests, stats). */
  waited = 0;

  constructor(ctx: AioContext, table: RangeLockTable) {
    this.#ctx = ctx;
    this.#table = table;
    this.#participant = table.register(this.#notifier.fd);
    ctx.setEventNotifier(this.#notifier, this.#onNotify);
  }

  /** Requests queued now. */
  get queued(): number {
    return this.#queue.length;
  }

  /**
   * Locks `r`'s range: true if it may run now, false if it was queued
   * (`r.lockGranted()` runs later, from this context). Overlapping
   * requests are granted in the order they began (table tickets), in any
   * thread. Hot path when not serialising.
   */
  begin(r: SerialisedRequest): boolean {
    const t = this.#table, p = this.#participant;
    if (!r.serialising && t.fastBegin(p)) {
      r.lockEntry = LOCK_FAST;
      return true;
    }
    const e = t.enqueue(p, r.lockLo, r.lockHi, r.serialising);
    r.lockEntry = e;
    if (e >= 0 && t.granted(e)) return true;
    this.waited++;
    this.#queue.push(r);
    return false;
  }

  /** Unlocks `r` once its I/O completed (wakes whoever waits for it). Hot path. */
  end(r: SerialisedRequest): void {
    const e = r.lockEntry;
    r.lockEntry = LOCK_NO_ENTRY;
    if (e === LOCK_FAST) this.#table.fastEnd(this.#participant);
    else this.#table.release(e);
  }

  /** Detaches from the table. Nothing may be in flight or queued. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#queue.length > 0) throw new Error("RequestSerialiser.close with requests queued");
    this.#ctx.setEventNotifier(this.#notifier, null);
    this.#table.unregister(this.#participant);
    this.#notifier.close();
  }

  /** Something was released somewhere: grant what can go now, in order. */
  #onNotify = (): void => {
    this.#notifier.testAndClear();
    const t = this.#table, p = this.#participant, q = this.#queue;
    let i = 0;
    while (i < q.length) {
      const r = q[i];
      if (r.lockEntry === LOCK_NO_ENTRY) {
        r.lockEntry = t.enqueue(p, r.lockLo, r.lockHi, r.serialising);
        if (r.lockEntry === LOCK_NO_ENTRY) break; // still full: wait for a release
      }
      if (!t.granted(r.lockEntry) && !t.retry(p, r.lockEntry)) {
        i++;
        continue;
      }
      q.splice(i, 1);
      r.lockGranted();
    }
  };
}
