import { AioContext, type AioNotifyHandle } from "./aio_context.ts";
import { ChannelEndpoint, createChannel } from "./channel.ts";
import type { IOThreadInit } from "./iothread_worker.ts";
import { decodeError, type WireError } from "./wire_error.ts";

/**
 * Options of {@link IOThread.start}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { IOThreadOptions } from "./mod.ts";
 * const o: IOThreadOptions = { name: "io0", modules: [] };
 * assert.equal(o.name, "io0");
 * ```
 */
export interface IOThreadOptions {
  /** Name for errors and the Worker. */
  name: string;
  /** Module URLs (or absolute paths) whose exported functions {@link IOThread.call} may run. */
  modules: string[];
  /** poll-max-ns of the thread's AioContext (default 32768). */
  pollMaxNs?: number;
  /** aio-max-batch of the thread's AioContext (default 0: the engines' own). */
  aioMaxBatch?: number;
  /** poll-grow / poll-shrink of the thread's AioContext (defaults: AioContext's). */
  pollGrow?: number;
  pollShrink?: number;
  /** Largest call or reply, in bytes of JSON (default 65532). */
  maxMessageBytes?: number;
  /**
   * Structured-cloned once at start (so it may hold SharedArrayBuffers) and
   * passed to every call as the third argument: `fn(ctx, args, data)`.
   */
  data?: unknown;
}

interface Pending {
  resolve(v: unknown): void;
  reject(e: Error): void;
}

interface ReplyMsg {
  id?: number;
  ok?: unknown;
  err?: WireError;
  stopped?: boolean;
}

const WORKER_URL = new URL("./iothread_worker.ts", import.meta.url);

function moduleUrl(m: string): string {
  if (/^[a-z]+:/.test(m)) return m;
  if (m.startsWith("/")) return new URL(`file://${m}`).href;
  throw new Error(`IOThread: module ${m} must be a URL or an absolute path`);
}

/**
 * QEMU's IOThread: a Deno Worker that owns an AioContext and runs
 * `while (!stopping) { ctx.poll(true); await microtasks }`. The main thread
 * talks to it with {@link call}, over a SharedArrayBuffer channel announced by
 * eventfd writes (the thread is usually blocked in epoll_wait, where
 * postMessage never reaches it). Replies are awaited with a main-side
 * AioContext's pollAsync, so the main event loop keeps running.
 *
 * Starting one costs a Worker start plus the module imports (tens of ms).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IOThread } from "./mod.ts";
 * const t = await IOThread.start({ name: "io0", modules: [] });
 * let err = "";
 * await t.call("missing").catch((e) => err = e.message);
 * assert(err.includes("no exported function missing"));
 * await t.stop();
 * ```
 */
export class IOThread {
  /** The name given at start. */
  readonly name: string;
  /** Milliseconds from start() to the thread being ready. */
  readonly startupMs: number;
  /** Wakes the thread's AioContext from here with {@link aioNotify}. */
  readonly notifyHandle: AioNotifyHandle;
  readonly #worker: Worker;
  readonly #chan: ChannelEndpoint;
  readonly #ctx: AioContext;
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #pumping: Promise<void> | undefined;
  #stopped = false;
  #stopResolve: (() => void) | undefined;
  #failure: Error | undefined;
  readonly #failed = Promise.withResolvers<Error>();

  private constructor(
    name: string,
    worker: Worker,
    chan: ChannelEndpoint,
    ctx: AioContext,
    startupMs: number,
    handle: AioNotifyHandle,
  ) {
    this.name = name;
    this.notifyHandle = handle;
    this.#worker = worker;
    this.#chan = chan;
    this.#ctx = ctx;
    this.startupMs = startupMs;
    chan.attach(ctx, (m) => this.#onReply(m as ReplyMsg));
    worker.onerror = (e) => {
      e.preventDefault();
      this.#fail(new Error(`IOThread ${name}: ${e.message}`));
    };
    // The loop posts { error } when a handler threw out of it: the thread no
    // longer serves its fds, which must not go unnoticed.
    worker.onmessage = (e: MessageEvent<{ error?: string }>) => {
      if (e.data?.error !== undefined) {
        this.#fail(new Error(`IOThread ${name}: event loop died: ${e.data.error}`));
      }
    };
  }

  /**
   * Resolves with the error once the thread's event loop has died (a handler
   * threw, or the Worker failed); never resolves for a thread that only
   * stops. What a host logs and acts on.
   *
   * @example
   * ```ts
   * import { IOThread } from "./mod.ts";
   * const t = await IOThread.start({ name: "io0", modules: [] });
   * t.failed.then((e) => console.error(e.message));
   * await t.stop();
   * ```
   */
  get failed(): Promise<Error> {
    return this.#failed.promise;
  }

  /**
   * Starts the Worker, imports `modules` in it and waits until its loop runs.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { IOThread } from "./mod.ts";
   * const t = await IOThread.start({ name: "io1", modules: [], pollMaxNs: 0 });
   * assert(t.startupMs > 0);
   * await t.stop();
   * ```
   */
  static async start(opts: IOThreadOptions): Promise<IOThread> {
    const t0 = performance.now();
    const init: IOThreadInit = {
      name: opts.name,
      modules: opts.modules.map(moduleUrl),
      pollMaxNs: opts.pollMaxNs,
      aioMaxBatch: opts.aioMaxBatch,
      pollGrow: opts.pollGrow,
      pollShrink: opts.pollShrink,
      channel: createChannel({ slotBytes: (opts.maxMessageBytes ?? 65532) + 4 }),
      data: opts.data,
    };
    const chan = new ChannelEndpoint(init.channel, 0);
    const worker = new Worker(WORKER_URL, { type: "module", name: `iothread-${opts.name}` });
    let handle: AioNotifyHandle | undefined;
    try {
      await new Promise<void>((resolve, reject) => {
        worker.onmessage = (
          e: MessageEvent<{ ready?: boolean; error?: string; handle?: AioNotifyHandle }>,
        ) => {
          handle = e.data.handle;
          if (e.data.ready) resolve();
          else reject(new Error(e.data.error ?? `IOThread ${opts.name}: bad start message`));
        };
        worker.onerror = (e) => {
          e.preventDefault();
          reject(new Error(`IOThread ${opts.name}: ${e.message}`));
        };
        worker.postMessage(init);
      });
    } catch (e) {
      worker.terminate();
      chan.close();
      throw e;
    }
    worker.onmessage = null;
    const ms = performance.now() - t0;
    return new IOThread(opts.name, worker, chan, new AioContext(), ms, handle!);
  }

  /**
   * Runs the exported function `fn` of one of the thread's modules as
   * `fn(ctx, args, data)` in the thread; resolves with its (awaited) result or
   * rejects with its error, rebuilt here as the same class when that class is
   * registered with {@link registerErrorClass} (SysError is; each layer's
   * mod.ts registers its own), else as an Error whose message starts with
   * the class name. `args` and the result travel as JSON.
   *
   * @example
   * ```ts
   * import { IOThread } from "./mod.ts";
   * const t = await IOThread.start({ name: "io2", modules: [] });
   * await t.call("nope", { x: 1 }).catch(() => {});
   * await t.stop();
   * ```
   */
  call<T>(fn: string, args?: unknown): Promise<T> {
    return this.#send<T>((id) => ({ id, fn, args }));
  }

  /**
   * Imports more `modules` (URLs or absolute paths) in the running thread:
   * their exported functions can be called from then on. The thread goes on
   * serving meanwhile (its loop waits with pollAsync while the import is
   * pending). For what only some exports of a thread need (the NBD
   * export's side), so threads that never serve one never compile it.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { IOThread } from "./mod.ts";
   * const t = await IOThread.start({ name: "io3", modules: [] });
   * await assert.rejects(t.call("seven"), /no exported function seven/);
   * await t.load(["data:application/javascript,export function seven() { return 7; }"]);
   * assert.equal(await t.call<number>("seven"), 7);
   * await t.stop();
   * ```
   */
  load(modules: string[]): Promise<void> {
    let urls: string[];
    try {
      urls = modules.map(moduleUrl);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.#send<void>((id) => ({ id, load: urls }));
  }

  #send<T>(msg: (id: number) => unknown): Promise<T> {
    if (this.#stopped) return Promise.reject(new Error(`IOThread ${this.name}: stopped`));
    if (this.#failure) return Promise.reject(this.#failure);
    const id = this.#nextId++;
    try {
      this.#chan.send(msg(id));
    } catch (e) {
      return Promise.reject(e);
    }
    const p = new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
    });
    this.#pump();
    return p;
  }

  #onReply(m: ReplyMsg): void {
    if (m.stopped) {
      this.#stopResolve?.();
      return;
    }
    const p = this.#pending.get(m.id!);
    if (!p) return;
    this.#pending.delete(m.id!);
    if (m.err !== undefined) p.reject(decodeError(m.err));
    else p.resolve(m.ok);
  }

  #fail(e: Error): void {
    if (this.#failure) return;
    this.#failure = e;
    this.#failed.resolve(e);
    for (const p of this.#pending.values()) p.reject(e);
    this.#pending.clear();
    this.#stopResolve?.();
    this.#ctx.notify();
  }

  /** Waits for replies on the main-side context while calls are outstanding. */
  #pump(): void {
    this.#pumping ??= (async () => {
      try {
        while ((this.#pending.size > 0 || this.#stopResolve) && !this.#ctx.closed) {
          await this.#ctx.pollAsync();
        }
      } finally {
        this.#pumping = undefined;
      }
    })();
  }

  /**
   * Ends the thread's loop, waits for it to close its context, and
   * terminates the Worker. Calls still pending are rejected.
   *
   * @example
   * ```ts
   * import { IOThread } from "./mod.ts";
   * const t = await IOThread.start({ name: "io3", modules: [] });
   * await t.stop(); await t.stop();
   * ```
   */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    if (!this.#failure) {
      const done = new Promise<void>((resolve) => this.#stopResolve = resolve);
      this.#chan.send({ stop: true });
      this.#pump();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<void>((r) => timer = setTimeout(r, 2000));
      await Promise.race([done, timeout]);
      clearTimeout(timer);
      this.#stopResolve = undefined;
      this.#ctx.notify();
    }
    await this.#pumping;
    const err = new Error(`IOThread ${this.name}: stopped`);
    for (const p of this.#pending.values()) p.reject(err);
    this.#pending.clear();
    this.#worker.terminate();
    this.#chan.close();
    this.#ctx.close();
  }
}
