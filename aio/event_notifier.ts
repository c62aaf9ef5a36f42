import {
  close,
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  eventfd,
  eventfdRead,
  eventfdWrite,
} from "../sys/mod.ts";

/**
 * QEMU's EventNotifier (util/event_notifier-posix.c) over a non-blocking
 * eventfd: `set()` from any thread, `testAndClear()` in the thread that waits
 * on `fd` (usually through {@link AioContext.setEventNotifier}).
 *
 * Another thread reaches the same kernel object by wrapping the fd number with
 * {@link EventNotifier.fromFd} (fd numbers are process-wide).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { EventNotifier } from "./mod.ts";
 * const n = new EventNotifier();
 * n.set();
 * assert(n.testAndClear());
 * assert(!n.testAndClear());
 * n.close();
 * ```
 */
export class EventNotifier {
  /** The eventfd. */
  readonly fd: number;
  readonly #owned: boolean;
  #closed = false;

  constructor(fd?: number) {
    this.#owned = fd === undefined;
    this.fd = fd ?? eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }

  /**
   * Wraps an eventfd created elsewhere (e.g. in another thread) without taking
   * ownership: `close()` will not close it.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { EventNotifier } from "./mod.ts";
   * const owner = new EventNotifier();
   * const peer = EventNotifier.fromFd(owner.fd);
   * peer.set();
   * assert(owner.testAndClear());
   * peer.close(); owner.close();
   * ```
   */
  static fromFd(fd: number): EventNotifier {
    return new EventNotifier(fd);
  }

  /**
   * Signals the notifier (event_notifier_set): thread-safe, idempotent until
   * cleared. Hot path: one write(2), no allocation.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { EventNotifier } from "./mod.ts";
   * const n = new EventNotifier();
   * n.set(); n.set();
   * assert(n.testAndClear());
   * n.close();
   * ```
   */
  set(): void {
    eventfdWrite(this.fd, 1);
  }

  /**
   * Clears the notifier and reports whether it was set
   * (event_notifier_test_and_clear). Hot path: one read(2), no allocation.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { EventNotifier } from "./mod.ts";
   * const n = new EventNotifier();
   * assert(!n.testAndClear());
   * n.close();
   * ```
   */
  testAndClear(): boolean {
    return eventfdRead(this.fd) !== 0;
  }

  /**
   * Closes the eventfd if this object created it; idempotent. Remove any
   * handler registered for it first.
   *
   * @example
   * ```ts
   * import { EventNotifier } from "./mod.ts";
   * const n = new EventNotifier();
   * n.close(); n.close();
   * ```
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#owned) close(this.fd);
  }
}
