/**
 * IOThread side of the cross-thread round-trip benchmarks in aio_bench.ts:
 * functions run inside the IOThread with `iothread.call`.
 *
 * @module
 */

import { type AioContext, aioNotify, type AioNotifyHandle, EventNotifier } from "../aio/mod.ts";

let cleanupEventfd: (() => void) | undefined;
let cleanupShared: (() => void) | undefined;

/**
 * Echo over eventfds: each time `ping` fires, clear it and set `pong`.
 *
 * @example
 * ```ts ignore
 * await iothread.call("echoEventfd", { ping: a.fd, pong: b.fd });
 * ```
 */
export function echoEventfd(ctx: AioContext, args: { ping: number; pong: number }): void {
  cleanupEventfd?.();
  const ping = EventNotifier.fromFd(args.ping), pong = EventNotifier.fromFd(args.pong);
  ctx.setEventNotifier(ping, () => {
    if (ping.testAndClear()) pong.set();
  });
  cleanupEventfd = () => ctx.setEventNotifier(ping, null);
}

/**
 * Echo over shared memory (the start `data`): word 0 is the main side's sequence number, word 1
 * ours. A poll callback sees a new ping (busy polling or after aioNotify),
 * copies it to word 1 and aio-notifies the main context.
 *
 * @example
 * ```ts ignore
 * await iothread.call("echoShared"); // start data: { seq, main: ctx.notifyHandle }
 * ```
 */
export function echoShared(
  ctx: AioContext,
  _args: unknown,
  data: { seq: SharedArrayBuffer; main: AioNotifyHandle },
): void {
  cleanupShared?.();
  const seq = new Int32Array(data.seq);
  const view = new Int32Array(data.main.state);
  const dummy = new EventNotifier();
  const reply = () => {
    Atomics.store(seq, 1, Atomics.load(seq, 0));
    aioNotify(data.main, view);
  };
  ctx.setEventNotifier(
    dummy,
    () => dummy.testAndClear(),
    () => Atomics.load(seq, 0) !== Atomics.load(seq, 1),
    reply,
  );
  cleanupShared = () => {
    ctx.setEventNotifier(dummy, null);
    dummy.close();
  };
}

/**
 * Removes the echo handlers.
 *
 * @example
 * ```ts ignore
 * await iothread.call("stopEcho");
 * ```
 */
export function stopEcho(): void {
  cleanupEventfd?.();
  cleanupShared?.();
  cleanupEventfd = cleanupShared = undefined;
}
