/**
 * A timer on an AioContext's clock (CLOCK_MONOTONIC, nanoseconds), as QEMU's
 * QEMUTimer on an AioContext timer list. Expired timers run in deadline order,
 * ties in the order they were armed, never before their deadline.
 *
 * Create one with {@link AioContext.timerNew}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "./mod.ts";
 * const ctx = new AioContext();
 * let fired = false;
 * const t = ctx.timerNew(() => fired = true);
 * t.modNs(ctx.now() + 1_000_000); // in 1 ms
 * while (!fired) ctx.poll(true);
 * assert(!t.pending);
 * ctx.close();
 * ```
 */
export class AioTimer {
  /** @internal Absolute deadline in ns, -1 when not armed. */
  _deadline = -1;
  /** @internal Arming order, for ties. */
  _seq = 0;
  /** @internal */
  readonly _cb: () => void;
  readonly #list: TimerList;

  /** @internal Use {@link AioContext.timerNew}. */
  constructor(list: TimerList, cb: () => void) {
    this.#list = list;
    this._cb = cb;
  }

  /** Whether the timer is armed. */
  get pending(): boolean {
    return this._deadline >= 0;
  }

  /** The armed deadline in ns, or -1. */
  get expireNs(): number {
    return this._deadline;
  }

  /**
   * Arms (or re-arms) the timer for the absolute time `deadlineNs` on the
   * context clock (timer_mod_ns).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * const t = ctx.timerNew(() => {});
   * t.modNs(ctx.now() + 1e9);
   * assert(t.pending);
   * t.del();
   * ctx.close();
   * ```
   */
  modNs(deadlineNs: number): void {
    if (!(deadlineNs >= 0)) throw new RangeError(`AioTimer: bad deadline ${deadlineNs}`);
    this.#list.remove(this);
    this.#list.insert(this, deadlineNs);
  }

  /**
   * Disarms the timer (timer_del); a no-op when not armed.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * const t = ctx.timerNew(() => {});
   * t.modNs(0); t.del();
   * assert(!ctx.poll(false));
   * ctx.close();
   * ```
   */
  del(): void {
    this.#list.remove(this);
  }
}

/**
 * The armed timers of one context, sorted by (deadline, arming order).
 *
 * @internal
 */
export class TimerList {
  readonly #timers: AioTimer[] = [];
  #nextSeq = 1;
  readonly #wake: () => void;

  /** `wake` is called when the earliest deadline moves earlier (timerlist_notify). */
  constructor(wake: () => void) {
    this.#wake = wake;
  }

  /** Earliest deadline in ns, or -1 when no timer is armed. */
  get nearest(): number {
    return this.#timers.length ? this.#timers[0]._deadline : -1;
  }

  insert(t: AioTimer, deadline: number): void {
    t._deadline = deadline;
    t._seq = this.#nextSeq++;
    const a = this.#timers;
    let lo = 0, hi = a.length;
    while (lo < hi) { // first index whose deadline is later
      const mid = (lo + hi) >>> 1;
      if (a[mid]._deadline <= deadline) lo = mid + 1;
      else hi = mid;
    }
    a.splice(lo, 0, t);
    if (lo === 0) this.#wake();
  }

  remove(t: AioTimer): void {
    if (t._deadline < 0) return;
    const i = this.#timers.indexOf(t);
    if (i >= 0) this.#timers.splice(i, 1);
    t._deadline = -1;
  }

  /**
   * Runs the timers expired at `now`, in order. A timer re-armed by a callback
   * runs at the earliest in the next call. Returns how many ran.
   */
  run(now: number): number {
    const a = this.#timers;
    const lastSeq = this.#nextSeq;
    let ran = 0;
    while (a.length && a[0]._deadline <= now && a[0]._seq < lastSeq) {
      const t = a.shift()!;
      t._deadline = -1;
      ran++;
      t._cb();
    }
    return ran;
  }
}
