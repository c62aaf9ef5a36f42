/**
 * A bottom half: a callback scheduled to run once in its AioContext's next
 * dispatch (QEMU util/async.c, QEMUBH). Scheduling an already scheduled BH is a
 * no-op; BHs run in the order they were scheduled.
 *
 * Create one with {@link AioContext.bhNew}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "./mod.ts";
 * const ctx = new AioContext();
 * let runs = 0;
 * const bh = ctx.bhNew(() => runs++, "example");
 * bh.schedule(); bh.schedule();
 * ctx.poll(false);
 * assert.equal(runs, 1);
 * assert(!bh.scheduled);
 * ctx.close();
 * ```
 */
export class BottomHalf {
  /** A name for traces and errors. */
  readonly name: string;
  /** @internal Sequence number of the pending schedule, 0 when not scheduled. */
  _seq = 0;
  /** @internal Deleted BHs can no longer be scheduled. */
  _deleted = false;
  /** @internal Deleted after its first run (aio_bh_schedule_oneshot). */
  readonly _oneshot: boolean;
  /** @internal */
  readonly _cb: () => void;
  readonly #queue: BhQueue;

  /** @internal Use {@link AioContext.bhNew}. */
  constructor(queue: BhQueue, cb: () => void, name: string, oneshot: boolean) {
    this.#queue = queue;
    this._cb = cb;
    this.name = name;
    this._oneshot = oneshot;
  }

  /** Whether the BH is waiting to run. */
  get scheduled(): boolean {
    return this._seq !== 0;
  }

  /** Whether {@link delete} has been called (or a oneshot BH has run). */
  get deleted(): boolean {
    return this._deleted;
  }

  /**
   * Schedules the BH to run once (qemu_bh_schedule) and wakes the context.
   * Hot path: no allocation once the queue has grown.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * const bh = ctx.bhNew(() => {});
   * bh.schedule();
   * assert(bh.scheduled);
   * ctx.close();
   * ```
   */
  schedule(): void {
    if (this._deleted) throw new Error(`BottomHalf ${this.name}: scheduled after delete`);
    if (this._seq !== 0) return;
    this.#queue.push(this);
  }

  /**
   * Unschedules the BH if it has not run yet (qemu_bh_cancel).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * let ran = false;
   * const bh = ctx.bhNew(() => ran = true);
   * bh.schedule(); bh.cancel();
   * ctx.poll(false);
   * assert(!ran);
   * ctx.close();
   * ```
   */
  cancel(): void {
    this._seq = 0;
  }

  /**
   * Cancels the BH and forbids scheduling it again (qemu_bh_delete).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * const bh = ctx.bhNew(() => {});
   * bh.schedule(); bh.delete();
   * assert(!ctx.poll(false));
   * assert(bh.deleted);
   * ctx.close();
   * ```
   */
  delete(): void {
    this._seq = 0;
    this._deleted = true;
  }
}

/**
 * The FIFO of scheduled BHs of one AioContext: a ring of (bh, sequence)
 * entries. A cancelled or rescheduled BH leaves a stale entry behind that is
 * skipped because its sequence no longer matches.
 *
 * @internal
 */
export class BhQueue {
  #bhs: (BottomHalf | undefined)[] = new Array(64);
  #seqs = new Float64Array(64);
  #mask = 63;
  #head = 0;
  #tail = 0;
  /**
   * Where the running batch ends (exclusive). A field, not a local, so that a
   * nested poll (a BH that calls ctx.poll) extends the batch the outer call
   * walks, and a grow or reset moves it along with head and tail.
   */
  #end = 0;
  #nextSeq = 1;
  /** Number of BHs that are scheduled (live entries). */
  #live = 0;
  readonly #wake: () => void;

  /** `wake` is called on every schedule (aio_notify). */
  constructor(wake: () => void) {
    this.#wake = wake;
  }

  /** Whether any entry (maybe stale) is queued: the context must not block. */
  get pending(): boolean {
    return this.#head !== this.#tail;
  }

  /** Appends `bh` with a fresh sequence number. */
  push(bh: BottomHalf): void {
    if (this.#tail - this.#head > this.#mask) this.#grow();
    const seq = this.#nextSeq++;
    bh._seq = seq;
    const i = this.#tail & this.#mask;
    this.#bhs[i] = bh;
    this.#seqs[i] = seq;
    this.#tail++;
    this.#wake();
  }

  #grow(): void {
    const n = (this.#mask + 1) * 2;
    const bhs: (BottomHalf | undefined)[] = new Array(n);
    const seqs = new Float64Array(n);
    for (let k = 0, j = this.#head; j < this.#tail; j++, k++) {
      bhs[k] = this.#bhs[j & this.#mask];
      seqs[k] = this.#seqs[j & this.#mask];
    }
    this.#tail -= this.#head;
    this.#end = this.#end > this.#head ? this.#end - this.#head : 0;
    this.#head = 0;
    this.#bhs = bhs;
    this.#seqs = seqs;
    this.#mask = n - 1;
  }

  /**
   * Runs the BHs that were queued when the call started (aio_bh_poll); ones
   * scheduled meanwhile run in the next call. Returns how many BHs ran.
   *
   * Nest-safe like QEMU's aio_bh_poll, which moves the list to a slice on the
   * stack and lets nested calls drain every open slice: here head and the
   * batch end are fields, so a BH that polls nested runs the rest of the outer
   * batch (and what was scheduled since) in order, and the outer call, back
   * from the BH, finds them run and stops. Nothing runs twice or is skipped.
   * Hot path: no allocation.
   */
  poll(): number {
    this.#end = this.#tail;
    let ran = 0;
    while (this.#head < this.#end) {
      const i = this.#head & this.#mask;
      const bh = this.#bhs[i]!;
      const seq = this.#seqs[i];
      this.#bhs[i] = undefined;
      this.#head++;
      if (bh._seq !== seq) continue; // cancelled, deleted or rescheduled later
      bh._seq = 0;
      if (bh._oneshot) bh._deleted = true;
      ran++;
      bh._cb();
    }
    if (this.#head === this.#tail) this.#head = this.#tail = this.#end = 0;
    return ran;
  }
}
