/**
 * One member of a throttle group in one thread (QEMU's
 * ThrottleGroupMember): the requests it holds back per direction (in
 * order), its two timers on its own AioContext (QEMU's ThrottleTimers), and
 * the eventfd other threads write when they arm one of those timers through
 * the group's shared state (see throttle_group.ts). Requests are released
 * only by these AioContext timers, never by the Deno event loop.
 *
 * @module
 */

import { type AioContext, type AioTimer, EventNotifier } from "../../aio/mod.ts";
import type { ThrottleGroup } from "./throttle_group.ts";
import { ThrottleDirection } from "./throttle_state.ts";

/** A request held back: what it counts as, and how to send it on. */
interface Held {
  bytes: number;
  go: () => void;
}

/**
 * A member of `group` whose timers run in `ctx`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { THROTTLE_GROUP_BYTES, ThrottleGroup } from "./throttle_group.ts";
 * import { ThrottleGroupMember } from "./throttle_group_member.ts";
 * import { throttleConfigInit } from "./throttle_config.ts";
 * const ctx = new AioContext();
 * const g = new ThrottleGroup(new ArrayBuffer(THROTTLE_GROUP_BYTES));
 * const c = throttleConfigInit();
 * c.buckets["iops-total"].avg = 200; // a bucket of 20, then one every 5 ms
 * g.init(c, ctx.now());
 * const m = new ThrottleGroupMember(ctx, g);
 * let done = 0;
 * const t0 = ctx.now();
 * for (let i = 0; i < 25; i++) m.intercept(0, 512, () => done++);
 * assert.equal(done, 21);
 * while (done < 25) ctx.poll(true);
 * assert(ctx.now() - t0 >= 15e6, "the last ones waited for the bucket");
 * m.close();
 * ctx.close();
 * ```
 */
export class ThrottleGroupMember {
  readonly group: ThrottleGroup;
  /** This member's index in the group. */
  readonly index: number;
  readonly #ctx: AioContext;
  readonly #held: [Held[], Held[]] = [[], []];
  readonly #timers: [AioTimer, AioTimer];
  readonly #wake: EventNotifier;
  #closed = false;

  constructor(ctx: AioContext, group: ThrottleGroup) {
    this.#ctx = ctx;
    this.group = group;
    this.#wake = new EventNotifier();
    this.#timers = [
      ctx.timerNew(() => this.#timerCb(ThrottleDirection.Read)),
      ctx.timerNew(() => this.#timerCb(ThrottleDirection.Write)),
    ];
    try {
      this.index = group.register(this.#wake.fd);
    } catch (e) {
      for (const t of this.#timers) t.del();
      this.#wake.close();
      throw e;
    }
    ctx.setEventNotifier(this.#wake, () => {
      this.#wake.testAndClear();
      this.#syncTimers();
    });
  }

  /** Requests held back now. */
  get held(): number {
    return this.#held[0].length + this.#held[1].length;
  }

  /**
   * Lets a request of `bytes` in direction `dir` through when the group
   * allows (throttle_group_co_io_limits_intercept): `go` runs now, or later
   * from this member's timer, in the order requests came.
   */
  intercept(dir: ThrottleDirection, bytes: number, go: () => void): void {
    if (this.mayGo(dir, bytes)) go();
    else this.hold(dir, bytes, go);
  }

  /**
   * The allocation-free half of {@link intercept}: true if the request may go
   * now (it is counted); false if the caller must {@link hold} it at once.
   * Hot path: no allocation.
   */
  mayGo(dir: ThrottleDirection, bytes: number): boolean {
    const go = this.group.intercept(this.index, dir, bytes, this.#ctx.now());
    if (this.group.dirty(this.index)) this.#syncTimers();
    return go;
  }

  /** Holds a request {@link mayGo} refused until the group's timer releases it. */
  hold(dir: ThrottleDirection, bytes: number, go: () => void): void {
    this.#held[dir].push({ bytes, go });
  }

  /**
   * Sends every held request on at once, past the limits (a drained section
   * begins or a queue stops: QEMU's throttle_group_restart_tgm), counted in
   * the buckets as they go.
   */
  releaseAll(): void {
    for (const dir of [ThrottleDirection.Read, ThrottleDirection.Write]) {
      const q = this.#held[dir].splice(0);
      if (q.length === 0) continue;
      this.group.release(this.index, dir, q.map((h) => h.bytes));
      for (const h of q) h.go();
    }
  }

  /** Leaves the group (held requests are released first); idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.releaseAll();
    this.group.unregister(this.index, this.#ctx.now());
    for (const t of this.#timers) t.del();
    this.#ctx.setEventNotifier(this.#wake, null);
    this.#wake.close();
  }

  /** Arms (or moves, or stops) the timers as the group's shared state says. */
  #syncTimers(): void {
    if (this.#closed) return;
    for (const dir of [ThrottleDirection.Read, ThrottleDirection.Write]) {
      const d = this.group.takeDeadline(this.index, dir);
      if (d >= 0) this.#timers[dir].modNs(d);
      else this.#timers[dir].del();
    }
  }

  /** QEMU's timer_cb + throttle_group_restart_queue: the next held request goes. */
  #timerCb(dir: ThrottleDirection): void {
    const g = this.group;
    g.timerFired(this.index, dir);
    const h = this.#held[dir].shift();
    if (h !== undefined) g.resume(this.index, dir, h.bytes, this.#ctx.now());
    else g.scheduleNext(this.index, dir, this.#ctx.now());
    if (g.dirty(this.index)) this.#syncTimers();
    h?.go();
  }
}
