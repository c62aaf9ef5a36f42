import { close as closeFd, eventfdWrite } from "../sys/mod.ts";
import type { AioContext } from "./aio_context.ts";
import { EventNotifier } from "./event_notifier.ts";

/**
 * What both ends of a {@link ChannelEndpoint} pair share: one
 * SharedArrayBuffer with two single-producer rings (lane 0: side 0 -> side 1,
 * lane 1: side 1 -> side 0) and the eventfd each side waits on.
 * Structured-cloneable: post it to the Worker.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { createChannel } from "./mod.ts";
 * const init = createChannel({ slots: 4, slotBytes: 1024 });
 * assert.equal(init.slotBytes, 1024);
 * ```
 */
export interface ChannelInit {
  sab: SharedArrayBuffer;
  slots: number;
  slotBytes: number;
  /** fds[k]: the eventfd side k waits on. */
  fds: [number, number];
}

// Per lane: an Int32 header [head, tail, senderWaiting, pad] then the slots.
const HDR_WORDS = 4;
const HEAD = 0, TAIL = 1, WAITING = 2;

/**
 * Allocates the shared memory and the two eventfds of a channel. Side 0 owns
 * the eventfds: close it last (its {@link ChannelEndpoint.close} closes them).
 *
 * @example
 * ```ts
 * import { createChannel, ChannelEndpoint } from "./mod.ts";
 * const init = createChannel();
 * const a = new ChannelEndpoint(init, 0), b = new ChannelEndpoint(init, 1);
 * b.close(); a.close();
 * ```
 */
export function createChannel(opts: { slots?: number; slotBytes?: number } = {}): ChannelInit {
  const slots = opts.slots ?? 16;
  const slotBytes = opts.slotBytes ?? 64 * 1024;
  if (slots < 1 || slotBytes < 8 || slotBytes % 4 !== 0) {
    throw new RangeError(`channel: bad geometry ${slots} x ${slotBytes}`);
  }
  const laneBytes = HDR_WORDS * 4 + slots * slotBytes;
  const a = new EventNotifier(), b = new EventNotifier();
  return { sab: new SharedArrayBuffer(2 * laneBytes), slots, slotBytes, fds: [a.fd, b.fd] };
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * One end of a cross-thread message channel: JSON messages in a
 * SharedArrayBuffer ring, announced with an eventfd write so that a peer
 * blocked in epoll_wait (an IOThread in `ctx.poll(true)`) wakes up; postMessage
 * would never reach it. Bounded: a message larger than `slotBytes - 4` bytes
 * of JSON is refused with a RangeError; when the ring is full, messages wait
 * in a local queue until the peer drains it. Control plane only.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext, ChannelEndpoint, createChannel } from "./mod.ts";
 * const init = createChannel();
 * const a = new ChannelEndpoint(init, 0), b = new ChannelEndpoint(init, 1);
 * const ctx = new AioContext();
 * const got: unknown[] = [];
 * b.attach(ctx, (m) => got.push(m));
 * a.send({ hello: 1 });
 * ctx.poll(true);
 * assert.equal(JSON.stringify(got), '[{"hello":1}]');
 * b.detach(); ctx.close(); b.close(); a.close();
 * ```
 */
export class ChannelEndpoint {
  /** Largest message, in bytes of UTF-8 JSON. */
  readonly maxMessageBytes: number;
  readonly #side: number;
  readonly #init: ChannelInit;
  readonly #tx: Int32Array;
  readonly #rx: Int32Array;
  readonly #txBytes: Uint8Array;
  readonly #rxBytes: Uint8Array;
  readonly #txLen: DataView;
  readonly #rxLen: DataView;
  readonly #notifier: EventNotifier;
  readonly #peerFd: number;
  readonly #backlog: Uint8Array[] = [];
  #ctx: AioContext | undefined;
  #onMessage: ((msg: unknown) => void) | undefined;
  #closed = false;

  constructor(init: ChannelInit, side: 0 | 1) {
    this.#init = init;
    this.#side = side;
    this.maxMessageBytes = init.slotBytes - 4;
    const laneBytes = HDR_WORDS * 4 + init.slots * init.slotBytes;
    const lane = (k: number) => new Int32Array(init.sab, k * laneBytes, HDR_WORDS);
    const data = (k: number) =>
      new Uint8Array(init.sab, k * laneBytes + HDR_WORDS * 4, init.slots * init.slotBytes);
    this.#tx = lane(side);
    this.#rx = lane(1 - side);
    this.#txBytes = data(side);
    this.#rxBytes = data(1 - side);
    this.#txLen = new DataView(init.sab, side * laneBytes + HDR_WORDS * 4);
    this.#rxLen = new DataView(init.sab, (1 - side) * laneBytes + HDR_WORDS * 4);
    this.#notifier = EventNotifier.fromFd(init.fds[side]);
    this.#peerFd = init.fds[1 - side];
  }

  /**
   * Sends `msg` (JSON-serialisable) to the other side. Throws RangeError when
   * it is too large.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { ChannelEndpoint, createChannel } from "./mod.ts";
   * const init = createChannel({ slotBytes: 64 });
   * const a = new ChannelEndpoint(init, 0);
   * assert.throws(() => a.send("x".repeat(100)), RangeError);
   * a.close();
   * ```
   */
  send(msg: unknown): void {
    if (this.#closed) throw new Error("channel: send after close");
    const bytes = encoder.encode(JSON.stringify(msg) ?? "null");
    if (bytes.length > this.maxMessageBytes) {
      throw new RangeError(
        `channel: message of ${bytes.length} bytes exceeds the limit of ${this.maxMessageBytes}`,
      );
    }
    if (this.#backlog.length === 0 && this.#put(bytes)) {
      eventfdWrite(this.#peerFd, 1);
      return;
    }
    this.#backlog.push(bytes);
    this.#flush();
  }

  #put(bytes: Uint8Array): boolean {
    const tail = Atomics.load(this.#tx, TAIL);
    if (tail - Atomics.load(this.#tx, HEAD) >= this.#init.slots) return false;
    const off = (tail % this.#init.slots) * this.#init.slotBytes;
    this.#txLen.setUint32(off, bytes.length, true);
    this.#txBytes.set(bytes, off + 4);
    Atomics.store(this.#tx, TAIL, tail + 1); // publishes the slot
    return true;
  }

  /**
   * Moves the backlog into free slots. Whenever some of it is left, WAITING
   * is (re-)armed so the peer's next receive wakes us, then we look once
   * more: the peer may have drained between our failed put and the store.
   * (A backlog left behind with WAITING already consumed would never be
   * flushed: the peer drains, sees WAITING 0 and does not wake us.)
   */
  #flush(): void {
    let sent = false;
    for (;;) {
      while (this.#backlog.length && this.#put(this.#backlog[0])) {
        this.#backlog.shift();
        sent = true;
      }
      if (this.#backlog.length === 0) break;
      Atomics.store(this.#tx, WAITING, 1);
      const free = Atomics.load(this.#tx, TAIL) - Atomics.load(this.#tx, HEAD) < this.#init.slots;
      if (!free) break;
    }
    if (sent) eventfdWrite(this.#peerFd, 1);
  }

  /**
   * Delivers incoming messages to `onMessage` from a handler on `ctx` (and
   * its busy-poll callback).
   *
   * @example
   * ```ts
   * import { AioContext, ChannelEndpoint, createChannel } from "./mod.ts";
   * const init = createChannel(), ctx = new AioContext();
   * const b = new ChannelEndpoint(init, 1);
   * b.attach(ctx, () => {});
   * b.detach(); ctx.close(); b.close();
   * new ChannelEndpoint(init, 0).close();
   * ```
   */
  attach(ctx: AioContext, onMessage: (msg: unknown) => void): void {
    this.#ctx = ctx;
    this.#onMessage = onMessage;
    ctx.setEventNotifier(
      this.#notifier,
      () => {
        this.#notifier.testAndClear();
        this.receive();
      },
      () => Atomics.load(this.#rx, TAIL) !== Atomics.load(this.#rx, HEAD),
      () => this.receive(),
    );
  }

  /**
   * Removes the handler installed by {@link attach}.
   *
   * @example
   * ```ts
   * import { ChannelEndpoint, createChannel } from "./mod.ts";
   * const a = new ChannelEndpoint(createChannel(), 0);
   * a.detach(); // a no-op when not attached
   * a.close();
   * ```
   */
  detach(): void {
    if (!this.#ctx) return;
    if (!this.#ctx.closed) this.#ctx.setEventNotifier(this.#notifier, null);
    this.#ctx = undefined;
  }

  /**
   * Delivers every queued incoming message now (the handler calls this);
   * returns how many.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { ChannelEndpoint, createChannel } from "./mod.ts";
   * const a = new ChannelEndpoint(createChannel(), 0);
   * assert.equal(a.receive(), 0);
   * a.close();
   * ```
   */
  receive(): number {
    let n = 0;
    const rx = this.#rx;
    for (;;) {
      const head = Atomics.load(rx, HEAD);
      if (head === Atomics.load(rx, TAIL)) break;
      const off = (head % this.#init.slots) * this.#init.slotBytes;
      const len = this.#rxLen.getUint32(off, true);
      const text = decoder.decode(this.#rxBytes.slice(off + 4, off + 4 + len));
      Atomics.store(rx, HEAD, head + 1);
      n++;
      this.#onMessage?.(JSON.parse(text));
    }
    // The peer has a backlog waiting for room: tell it there is some now.
    if (n && Atomics.exchange(rx, WAITING, 0) !== 0) eventfdWrite(this.#peerFd, 1);
    if (this.#backlog.length) this.#flush();
    return n;
  }

  /**
   * Detaches; side 0 also closes both eventfds (do it after the peer is done).
   *
   * @example
   * ```ts
   * import { ChannelEndpoint, createChannel } from "./mod.ts";
   * const a = new ChannelEndpoint(createChannel(), 0);
   * a.close(); a.close();
   * ```
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.detach();
    if (this.#side === 0) {
      closeFd(this.#init.fds[0]);
      closeFd(this.#init.fds[1]);
    }
  }
}
