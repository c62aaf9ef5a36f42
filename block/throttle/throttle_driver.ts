/**
 * The `throttle` filter driver (QEMU's block/throttle.c): sits over a child
 * driver and lets reads and writes through only as fast as its throttle
 * group allows, as one member of it ({@link ThrottleGroupMember}). Writes,
 * write-zeroes and discards count as writes of their length; flushes are
 * not throttled. A drained section releases what the filter holds
 * ({@link ThrottleDriver.releaseHeld}, as QEMU's throttle_co_drain_begin).
 *
 * @module
 */

import type { AioContext } from "../../aio/mod.ts";
import type { BlockCompletion, BlockDriver } from "../block_driver.ts";
import type { IoVector } from "../io_vector.ts";
import type { ThrottleGroup } from "./throttle_group.ts";
import { ThrottleGroupMember } from "./throttle_group_member.ts";
import { ThrottleDirection } from "./throttle_state.ts";

const READ = ThrottleDirection.Read, WRITE = ThrottleDirection.Write;

/**
 * A throttled view of `child`, a member of `group` in `ctx`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { IoVector, NullCoDriver } from "../mod.ts";
 * import { ThrottleDriver } from "./throttle_driver.ts";
 * import { THROTTLE_GROUP_BYTES, ThrottleGroup } from "./throttle_group.ts";
 * import { throttleConfigInit } from "./throttle_config.ts";
 * const ctx = new AioContext();
 * const group = new ThrottleGroup(new ArrayBuffer(THROTTLE_GROUP_BYTES));
 * const c = throttleConfigInit();
 * c.buckets["iops-total"].avg = 100; // a bucket of 10, then one every 10 ms
 * group.init(c, ctx.now());
 * const d = new ThrottleDriver(ctx, new NullCoDriver(ctx, { size: 1 << 20 }), group);
 * const qiov = IoVector.fromBuffers([new Uint8Array(512)]);
 * let done = 0;
 * const t0 = ctx.now();
 * for (let i = 0; i < 14; i++) d.preadv(0, qiov, () => done++);
 * while (done < 14) ctx.poll(true);
 * assert(ctx.now() - t0 >= 25e6, "the last ones waited for the bucket");
 * await d.close();
 * ctx.close();
 * ```
 */
export class ThrottleDriver implements BlockDriver {
  readonly name = "throttle";
  readonly child: BlockDriver;
  readonly member: ThrottleGroupMember;

  constructor(ctx: AioContext, child: BlockDriver, group: ThrottleGroup) {
    this.child = child;
    this.member = new ThrottleGroupMember(ctx, group);
  }

  get length(): number {
    return this.child.length;
  }
  get requestAlignment(): number {
    return this.child.requestAlignment;
  }
  get memAlignment(): number {
    return this.child.memAlignment;
  }

  /** Requests held back by the group's limits now. */
  get throttled(): number {
    return this.member.held;
  }

  /** Hot path: one locked bucket check; allocates only for a request that must wait. */
  preadv(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.member.mayGo(READ, qiov.size)) this.child.preadv(offset, qiov, cb);
    else this.member.hold(READ, qiov.size, () => this.child.preadv(offset, qiov, cb));
  }

  /** Hot path, as {@link preadv}. */
  pwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.member.mayGo(WRITE, qiov.size)) this.child.pwritev(offset, qiov, cb);
    else this.member.hold(WRITE, qiov.size, () => this.child.pwritev(offset, qiov, cb));
  }

  pdiscard(offset: number, bytes: number, cb: BlockCompletion): void {
    this.member.intercept(WRITE, bytes, () => this.child.pdiscard(offset, bytes, cb));
  }

  pwriteZeroes(offset: number, bytes: number, unmap: boolean, cb: BlockCompletion): void {
    this.member.intercept(WRITE, bytes, () => this.child.pwriteZeroes(offset, bytes, unmap, cb));
  }

  flush(cb: BlockCompletion): void {
    this.child.flush(cb);
  }

  ioPlug(): void {
    this.child.ioPlug();
  }
  ioUnplug(): void {
    this.child.ioUnplug();
  }

  refreshLength(): number {
    return this.child.refreshLength();
  }

  setInlineCompletion(on: boolean): boolean {
    return this.child.setInlineCompletion?.(on) ?? false;
  }

  /**
   * Sends every held request on at once, past the limits (a drained section
   * begins, a queue stops), so waiting for in-flight requests ends.
   */
  releaseHeld(): void {
    this.child.ioPlug();
    try {
      this.member.releaseAll();
    } finally {
      this.child.ioUnplug();
    }
  }

  /** Leaves the group and closes the child (nothing may be in flight). */
  async close(): Promise<void> {
    this.member.close();
    await this.child.close();
  }
}
