/**
 * The body of an {@link IOThread} Worker: imports the modules it was given,
 * owns an AioContext and runs `while (!stopping) { ctx.poll(true); yield }`.
 * While a promise given to `ctx.waitEventLoop` is pending (a block driver's
 * modules being imported), the loop waits with `ctx.pollAsync()` so Deno's
 * event loop runs. Calls arrive on the channel as `{ id, fn, args }` and run
 * `fn(ctx, args, data)` (`data` as given to IOThread.start);
 * the (possibly async) result goes back as `{ id, ok }`, a thrown error as
 * `{ id, err }` with `err` a {@link WireError} (class name, message, stack,
 * fields) that the main thread rebuilds.
 *
 * @module
 */

import { blockAsyncSignals } from "../sys/mod.ts";
import { AioContext } from "./aio_context.ts";
import { ChannelEndpoint, type ChannelInit } from "./channel.ts";
import { encodeError, type WireError } from "./wire_error.ts";

// Signals belong to the main thread: none interrupts this thread's epoll_wait
// or its engines' system calls (SIGUSR1/SIGINT/SIGTERM go to the main thread).
blockAsyncSignals();

/** What the main thread posts to a new IOThread Worker. */
export interface IOThreadInit {
  name: string;
  modules: string[];
  pollMaxNs?: number;
  aioMaxBatch?: number;
  pollGrow?: number;
  pollShrink?: number;
  channel: ChannelInit;
  /** Structured-cloned start data (may hold SharedArrayBuffers), passed to every call. */
  data?: unknown;
}

type CallFn = (ctx: AioContext, args: unknown, data: unknown) => unknown;

interface CallMsg {
  id?: number;
  fn?: string;
  args?: unknown;
  /** IOThread.load: modules to import now. */
  load?: string[];
  stop?: boolean;
}

const scope = self as unknown as {
  onmessage: ((e: MessageEvent<IOThreadInit>) => void) | null;
  postMessage(msg: unknown): void;
  close(): void;
};

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** The error with its stack (for a loop that died: where matters). */
function errorWithStack(e: unknown): string {
  return e instanceof Error && e.stack ? e.stack : String(e);
}

/** Drains microtasks fully: a macrotask turn runs after every queued microtask. */
function macrotask(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/** Adds the exported functions of `mod` to `fns` (a name already there keeps its function). */
function addFunctions(fns: Map<string, CallFn>, mod: Record<string, unknown>): void {
  for (const [k, v] of Object.entries(mod)) {
    if (typeof v === "function" && !fns.has(k)) fns.set(k, v as CallFn);
  }
}

async function run(init: IOThreadInit): Promise<void> {
  const fns = new Map<string, CallFn>();
  try {
    for (const m of init.modules) addFunctions(fns, await import(m));
  } catch (e) {
    scope.postMessage({ error: `IOThread ${init.name}: loading modules: ${errorText(e)}` });
    return;
  }
  const ctx = new AioContext({
    pollMaxNs: init.pollMaxNs,
    aioMaxBatch: init.aioMaxBatch,
    pollGrow: init.pollGrow,
    pollShrink: init.pollShrink,
  });
  const chan = new ChannelEndpoint(init.channel, 1);
  let stopping = false;
  let running = 0; // async calls not settled yet

  const reply = (id: number, ok: boolean, value: unknown) => {
    try {
      chan.send(ok ? { id, ok: value === undefined ? null : value } : { id, err: value });
    } catch (e) {
      const err = value as WireError;
      if (!ok && err.stack !== undefined) {
        reply(id, false, { ...err, stack: undefined }); // the error matters more than its stack
        return;
      }
      // No stack here: this reply must fit where the first did not.
      const message = `IOThread ${init.name}: reply: ${errorText(e)}`;
      chan.send({ id, err: { name: "Error", message, fields: {} } });
    }
  };

  chan.attach(ctx, (raw) => {
    const msg = raw as CallMsg;
    if (msg.stop) {
      stopping = true;
      return;
    }
    const id = msg.id!;
    if (msg.load !== undefined) {
      const urls = msg.load;
      running++;
      (async () => {
        for (const m of urls) addFunctions(fns, await ctx.waitEventLoop(import(m)));
      })().then(
        () => reply(id, true, undefined),
        (e) => reply(id, false, encodeError(e)),
      ).finally(() => running--);
      return;
    }
    const fn = fns.get(msg.fn ?? "");
    if (!fn) {
      reply(
        id,
        false,
        encodeError(new Error(`IOThread ${init.name}: no exported function ${msg.fn}`)),
      );
      return;
    }
    let result: unknown;
    try {
      result = fn(ctx, msg.args, init.data);
    } catch (e) {
      reply(id, false, encodeError(e));
      return;
    }
    if (result instanceof Promise) {
      running++;
      result.then(
        (v) => reply(id, true, v),
        (e) => reply(id, false, encodeError(e)),
      ).finally(() => running--);
    } else {
      reply(id, true, result);
    }
  });
  scope.postMessage({ ready: true, handle: ctx.notifyHandle });

  while (!stopping) {
    // A module being imported (ctx.waitEventLoop) settles on Deno's event
    // loop, which a blocking poll would starve: wait through pollAsync then.
    if (ctx.eventLoopWaits > 0) await ctx.pollAsync();
    else ctx.poll(true);
    // Let promise continuations run. While async calls are pending, yield a
    // whole macrotask so chains of any depth settle before blocking again.
    if (running > 0) await macrotask();
    else await null;
  }
  chan.send({ stopped: true });
  chan.detach();
  ctx.close();
  chan.close();
}

scope.onmessage = (e) => {
  scope.onmessage = null;
  run(e.data).catch((err) => scope.postMessage({ error: errorWithStack(err) }));
};
