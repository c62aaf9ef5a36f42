/**
 * A throttle group's shared state and its scheduling (QEMU's
 * block/throttle-groups.c): one {@link ThrottleState} that every member
 * (every `throttle` node naming the group) counts its requests in, served
 * round-robin: per direction, a token names the member whose turn it is
 * and at most one member's timer is armed in the whole group
 * (`any_timer_armed`); when a request goes, the next member with pending
 * requests is scheduled (`schedule_next_request`).
 *
 * Members may run in different IOThreads, each with its own AioContext and
 * timers, so all of this lives in memory every thread maps (the daemon's
 * mapping, or any ArrayBuffer in one thread) and is guarded by a spin lock
 * held only for the bucket arithmetic and the token bookkeeping, never while
 * waiting. A member's timer cannot be armed from another thread, so arming
 * one (QEMU's timer_mod on `token`'s timer) writes the member's deadline in
 * its slot, raises its `dirty` flag and writes its eventfd; the member's
 * AioContext then sets its own AioTimer (see throttle_group_member.ts). The
 * eventfd is written under the lock, so a member that leaves (and closes it)
 * is never written to afterwards.
 *
 * @module
 */

import { eventfdWrite, schedYield } from "../../sys/mod.ts";
import {
  type ThrottleBucketName,
  type ThrottleConfig,
  throttleIsValid,
} from "./throttle_config.ts";
import { THROTTLE_STATE_SLOTS, type ThrottleDirection, ThrottleState } from "./throttle_state.ts";

/** Most members (throttle nodes) one group takes. */
export const THROTTLE_GROUP_MAX_MEMBERS = 32;

// Header, Int32 indexes.
const LOCK = 0;
const MAGIC = 1;
const TOKEN = 2; // + dir: member index or -1
const ARMED = 4; // + dir: any_timer_armed
const HIGH = 6; // slots [0, HIGH) may be in use
const HEADER_BYTES = 64;
const STATE_BYTES = THROTTLE_STATE_SLOTS * 8;
const MEMBERS_AT = HEADER_BYTES + STATE_BYTES;
// A member slot: Int32 [USED, FD, PENDING + dir, DIRTY], Float64 DEADLINE + dir at bytes 24, 32.
const MEMBER_BYTES = 48;
const M_USED = 0, M_FD = 1, M_PENDING = 2, M_DIRTY = 4;
const M_DEADLINE = 3; // Float64 index within the slot
const MAGIC_VALUE = 0x54475250; // "TGRP"

/** Bytes of memory one group takes. */
export const THROTTLE_GROUP_BYTES = MEMBERS_AT + THROTTLE_GROUP_MAX_MEMBERS * MEMBER_BYTES;

/** A group that cannot take another member, or an invalid configuration. */
export class ThrottleGroupError extends Error {
  override name = "ThrottleGroupError";
}

/**
 * A throttle group over `buffer` (at least {@link THROTTLE_GROUP_BYTES}).
 * The creator calls {@link ThrottleGroup.init}; every thread that has members
 * builds its own ThrottleGroup over the same memory.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { THROTTLE_GROUP_BYTES, ThrottleGroup } from "./throttle_group.ts";
 * import { throttleConfigInit } from "./throttle_config.ts";
 * const g = new ThrottleGroup(new ArrayBuffer(THROTTLE_GROUP_BYTES));
 * const c = throttleConfigInit();
 * c.buckets["iops-total"].avg = 10; // bucket of 1
 * g.init(c, 0);
 * const m = g.register(-1);
 * assert(g.intercept(m, 0, 512, 0)); // goes
 * assert(g.intercept(m, 0, 512, 0)); // level 1 is not over the bucket
 * assert(!g.intercept(m, 0, 512, 0)); // must wait: queued, the member's timer armed
 * assert.equal(g.takeDeadline(m, 0), 100e6);
 * ```
 */
export class ThrottleGroup {
  readonly #i: Int32Array;
  readonly #f: Float64Array;
  readonly #ts: ThrottleState;

  constructor(buffer: ArrayBufferLike, byteOffset = 0) {
    if (buffer.byteLength - byteOffset < THROTTLE_GROUP_BYTES) {
      throw new RangeError(`a throttle group needs ${THROTTLE_GROUP_BYTES} bytes`);
    }
    this.#i = new Int32Array(buffer, byteOffset, THROTTLE_GROUP_BYTES / 4);
    this.#f = new Float64Array(buffer, byteOffset, THROTTLE_GROUP_BYTES / 8);
    this.#ts = new ThrottleState(this.#f, HEADER_BYTES / 8);
  }

  /** Sets up fresh memory with `c` (the group's creation, throttle_group_obj_complete). */
  init(c: ThrottleConfig, nowNs: number): void {
    const err = throttleIsValid(c);
    if (err !== null) throw new ThrottleGroupError(err);
    this.#i.fill(0);
    this.#i[TOKEN] = this.#i[TOKEN + 1] = -1;
    for (let m = 0; m < THROTTLE_GROUP_MAX_MEMBERS; m++) this.#i[this.#slot(m) + M_FD] = -1;
    this.#ts.config(c, nowNs);
    Atomics.store(this.#i, MAGIC, MAGIC_VALUE);
  }

  /**
   * New limits (qom-set `limits`, throttle_config): the buckets empty, and
   * an armed timer fires at once so that what waits is scheduled under the
   * new limits. Throws {@link ThrottleGroupError} with QEMU's message when
   * `c` is invalid (nothing changes then).
   */
  config(c: ThrottleConfig, nowNs: number): void {
    const err = throttleIsValid(c);
    if (err !== null) throw new ThrottleGroupError(err);
    this.#lock();
    try {
      this.#ts.config(c, nowNs);
      for (let m = 0; m < THROTTLE_GROUP_MAX_MEMBERS; m++) {
        if (!this.#i[this.#slot(m) + M_USED]) continue;
        for (const dir of [0, 1] as const) {
          if (this.#deadline(m, dir) >= 0) this.#setDeadline(m, dir, nowNs, true);
        }
      }
    } finally {
      this.#unlock();
    }
  }

  /** The limits in force. */
  getConfig(): ThrottleConfig {
    this.#lock();
    try {
      return this.#ts.getConfig();
    } finally {
      this.#unlock();
    }
  }

  /** A bucket's level and burst level now (without leaking; for tests and metrics). */
  level(name: ThrottleBucketName): { level: number; burstLevel: number } {
    this.#lock();
    try {
      return this.#ts.level(name);
    } finally {
      this.#unlock();
    }
  }

  /** Members registered now. */
  get members(): number {
    let n = 0;
    for (let m = 0; m < THROTTLE_GROUP_MAX_MEMBERS; m++) n += this.#i[this.#slot(m) + M_USED];
    return n;
  }

  /**
   * Adds a member whose AioContext is woken by writing `wakeFd` (an eventfd;
   * -1 for a member that polls {@link dirty} itself). Returns its index
   * (throttle_group_register_tgm).
   */
  register(wakeFd: number): number {
    if (Atomics.load(this.#i, MAGIC) !== MAGIC_VALUE) {
      throw new ThrottleGroupError("throttle group memory was not initialised");
    }
    this.#lock();
    try {
      for (let m = 0; m < THROTTLE_GROUP_MAX_MEMBERS; m++) {
        const s = this.#slot(m);
        if (this.#i[s + M_USED]) continue;
        this.#i[s + M_USED] = 1;
        this.#i[s + M_FD] = wakeFd;
        if (m >= this.#i[HIGH]) this.#i[HIGH] = m + 1;
        this.#i[s + M_PENDING] = this.#i[s + M_PENDING + 1] = 0;
        this.#i[s + M_DIRTY] = 0;
        this.#f[(this.#slotBytes(m) >> 3) + M_DEADLINE] = -1;
        this.#f[(this.#slotBytes(m) >> 3) + M_DEADLINE + 1] = -1;
        for (const dir of [0, 1]) if (this.#i[TOKEN + dir] < 0) this.#i[TOKEN + dir] = m;
        return m;
      }
    } finally {
      this.#unlock();
    }
    throw new ThrottleGroupError(
      `a throttle group takes at most ${THROTTLE_GROUP_MAX_MEMBERS} members`,
    );
  }

  /**
   * Removes member `m` (throttle_group_unregister_tgm, after
   * throttle_group_detach_aio_context): its armed timer, if any, passes to
   * the next member with pending requests; the token moves on. The member
   * has no pending request left.
   */
  unregister(m: number, nowNs: number): void {
    this.#lock();
    try {
      const s = this.#slot(m);
      this.#i[s + M_PENDING] = this.#i[s + M_PENDING + 1] = 0;
      for (const dir of [0, 1] as const) {
        if (this.#deadline(m, dir) >= 0) {
          this.#setDeadlineRaw(m, dir, -1);
          this.#i[ARMED + dir] = 0;
          this.#scheduleNext(m, dir, nowNs);
        }
      }
      this.#i[s + M_FD] = -1;
      this.#i[s + M_USED] = 0;
      for (const dir of [0, 1]) {
        if (this.#i[TOKEN + dir] === m) {
          const next = this.#nextTgm(m);
          this.#i[TOKEN + dir] = next === m ? -1 : next;
        }
      }
    } finally {
      this.#unlock();
    }
  }

  /**
   * The first half of throttle_group_co_io_limits_intercept: true if a
   * request of `bytes` from member `m` may go now (it is counted and the
   * next member scheduled); false if it must wait (counted as pending: the
   * caller queues it, and a timer of the group releases it). Hot path with
   * throttling on: no allocation.
   */
  intercept(m: number, dir: ThrottleDirection, bytes: number, nowNs: number): boolean {
    this.#lock();
    try {
      const token = this.#nextThrottleToken(m, dir);
      const mustWait = this.#scheduleTimer(token, dir, nowNs);
      const p = this.#slot(m) + M_PENDING + dir;
      if (mustWait || this.#i[p] > 0) {
        this.#i[p]++;
        return false;
      }
      this.#ts.account(dir, bytes);
      this.#scheduleNext(m, dir, nowNs);
      return true;
    } finally {
      this.#unlock();
    }
  }

  /**
   * Member `m`'s timer for `dir` fired (throttle_group timer_cb): no timer of
   * the group is armed any more. Then the member either resumes its first
   * waiting request ({@link resume}) or, with none, calls
   * {@link scheduleNext}.
   */
  timerFired(m: number, dir: ThrottleDirection): void {
    this.#lock();
    try {
      if (this.#deadline(m, dir) >= 0) {
        this.#setDeadlineRaw(m, dir, -1);
        this.#i[ARMED + dir] = 0;
      }
    } finally {
      this.#unlock();
    }
  }

  /** A waiting request of `m` goes (the rest of the intercept): counted, next scheduled. */
  resume(m: number, dir: ThrottleDirection, bytes: number, nowNs: number): void {
    this.#lock();
    try {
      this.#i[this.#slot(m) + M_PENDING + dir]--;
      this.#ts.account(dir, bytes);
      this.#scheduleNext(m, dir, nowNs);
    } finally {
      this.#unlock();
    }
  }

  /** schedule_next_request, for a member whose timer fired with nothing queued. */
  scheduleNext(m: number, dir: ThrottleDirection, nowNs: number): void {
    this.#lock();
    try {
      this.#scheduleNext(m, dir, nowNs);
    } finally {
      this.#unlock();
    }
  }

  /**
   * Waiting requests of `m` that go past the limits (a drained section
   * begins, a queue stops: throttle_group_restart_tgm with limits
   * disabled): each is counted, none is pending any more.
   */
  release(m: number, dir: ThrottleDirection, bytes: readonly number[]): void {
    this.#lock();
    try {
      this.#i[this.#slot(m) + M_PENDING + dir] -= bytes.length;
      for (const b of bytes) this.#ts.account(dir, b);
    } finally {
      this.#unlock();
    }
  }

  /** Whether someone armed or moved `m`'s timers since it last took its deadlines. */
  dirty(m: number): boolean {
    return Atomics.load(this.#i, this.#slot(m) + M_DIRTY) !== 0;
  }

  /**
   * Clears `m`'s dirty flag and returns the deadline (ns; -1: none) its
   * timer for `dir` must have. Call for both directions after {@link dirty}.
   */
  takeDeadline(m: number, dir: ThrottleDirection): number {
    this.#lock();
    try {
      Atomics.store(this.#i, this.#slot(m) + M_DIRTY, 0);
      return this.#deadline(m, dir);
    } finally {
      this.#unlock();
    }
  }

  /** Requests of `m` waiting in direction `dir`. */
  pending(m: number, dir: ThrottleDirection): number {
    return Atomics.load(this.#i, this.#slot(m) + M_PENDING + dir);
  }

  // ---- under the lock ----

  #slot(m: number): number {
    return (MEMBERS_AT + m * MEMBER_BYTES) >> 2;
  }
  #slotBytes(m: number): number {
    return MEMBERS_AT + m * MEMBER_BYTES;
  }
  #deadline(m: number, dir: number): number {
    return this.#f[(this.#slotBytes(m) >> 3) + M_DEADLINE + dir];
  }
  #setDeadlineRaw(m: number, dir: number, v: number): void {
    this.#f[(this.#slotBytes(m) >> 3) + M_DEADLINE + dir] = v;
  }

  /** timer_mod on member `t`'s timer: `force` moves a pending one (else it stays). */
  #setDeadline(t: number, dir: number, when: number, force: boolean): void {
    if (!force && this.#deadline(t, dir) >= 0) return;
    this.#setDeadlineRaw(t, dir, when);
    const s = this.#slot(t);
    Atomics.store(this.#i, s + M_DIRTY, 1);
    const fd = this.#i[s + M_FD];
    if (fd >= 0) eventfdWrite(fd, 1);
  }

  /** throttle_group_next_tgm: the next member, round the list. */
  #nextTgm(m: number): number {
    const high = this.#i[HIGH];
    for (let k = 1; k <= high; k++) {
      const n = (m + k) % high;
      if (this.#i[this.#slot(n) + M_USED]) return n;
    }
    return m;
  }

  #hasPending(m: number, dir: number): boolean {
    return this.#i[this.#slot(m) + M_PENDING + dir] > 0;
  }

  /**
   * next_throttle_token: from the current token on, the next member with
   * pending requests; none: `m` itself (its request is the one at hand).
   */
  #nextThrottleToken(m: number, dir: number): number {
    let start = this.#i[TOKEN + dir];
    if (start < 0 || !this.#i[this.#slot(start) + M_USED]) start = m;
    let token = this.#nextTgm(start);
    while (token !== start && !this.#hasPending(token, dir)) token = this.#nextTgm(token);
    if (token === start && !this.#hasPending(token, dir)) token = m;
    return token;
  }

  /**
   * throttle_group_schedule_timer: true if a request of `token` must wait;
   * arms `token`'s timer when no timer of the group is armed.
   */
  #scheduleTimer(token: number, dir: ThrottleDirection, nowNs: number): boolean {
    if (this.#i[ARMED + dir]) return true;
    const wait = this.#ts.computeWaitFor(dir, nowNs);
    if (wait === 0) return false;
    this.#setDeadline(token, dir, nowNs + wait, false);
    this.#i[TOKEN + dir] = token;
    this.#i[ARMED + dir] = 1;
    return true;
  }

  /** schedule_next_request: the next member with pending requests gets a timer (now, or when the buckets allow). */
  #scheduleNext(m: number, dir: ThrottleDirection, nowNs: number): void {
    const token = this.#nextThrottleToken(m, dir);
    if (!this.#hasPending(token, dir)) return;
    if (!this.#scheduleTimer(token, dir, nowNs)) {
      this.#setDeadline(token, dir, nowNs, true);
      this.#i[ARMED + dir] = 1;
      this.#i[TOKEN + dir] = token;
    }
  }

  #lock(): void {
    // Held for a few hundred instructions at most: spin, and give the CPU
    // away now and then in case the holder was preempted (2 busy cores). Not
    // aio/'s futexLock: this state lives in memory the daemon mmapped
    // (viewAt), not a SharedArrayBuffer, and Atomics.wait cannot sleep on that.
    for (let spins = 1; Atomics.compareExchange(this.#i, LOCK, 0, 1) !== 0; spins++) {
      if ((spins & 127) === 0) schedYield();
    }
  }

  #unlock(): void {
    Atomics.store(this.#i, LOCK, 0);
  }
}
