/**
 * aio/: the event loop layer (QEMU util/aio-posix.c, util/async.c,
 * util/thread-pool.c, iothread.c). {@link AioContext} multiplexes fd handlers
 * over epoll with bottom halves, nanosecond timers and adaptive busy polling;
 * {@link EventNotifier} wraps an eventfd; {@link ThreadPool} runs blocking
 * system calls on Workers and completes them in the submitting context;
 * {@link IOThread} is a Worker that owns an AioContext and takes calls from
 * the main thread over a SharedArrayBuffer channel.
 *
 * Not for: block-layer policy (block/), virtqueues (virtio/) or sockets
 * protocols (dataplane/). Only sys/mod.ts is imported from below.
 *
 * @module
 */

export { EventNotifier } from "./event_notifier.ts";
export { BottomHalf } from "./bottom_half.ts";
export { AioTimer } from "./aio_timer.ts";
export {
  AioContext,
  type AioContextOptions,
  type AioHandler,
  aioNotify,
  type AioNotifyHandle,
  type AioStats,
} from "./aio_context.ts";
export {
  ThreadPool,
  type ThreadPoolCompletion,
  type ThreadPoolOptions,
  ThreadPoolRequest,
} from "./thread_pool.ts";
export { ChannelEndpoint, type ChannelInit, createChannel } from "./channel.ts";
export { IOThread, type IOThreadOptions } from "./iothread.ts";
export {
  decodeError,
  encodeError,
  type ErrorClass,
  registerErrorClass,
  type WireError,
} from "./wire_error.ts";
export { futexLock, futexUnlock } from "./futex_mutex.ts";
