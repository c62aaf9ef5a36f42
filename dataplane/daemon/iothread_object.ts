/**
 * `--object iothread,id=...` / QMP `object-add`: a named IOThread (a Deno
 * Worker with its own AioContext, blk_iothread.ts loaded; an NBD export
 * loads dataplane/nbd/nbd_iothread.ts into it when it first needs it) that
 * exports run in. Several exports share one: each call into the thread names its export
 * ({@link ExportThread}), so each has its own BlockBackend and dataplane there.
 *
 * @module
 */

import { IOThread } from "../../aio/mod.ts";
import type { BlkThreadData } from "../blk_iothread.ts";
import { DEFAULT_AIO_MAX_BATCH } from "../host_options.ts";
import { DaemonError, type OptionObject, QapiInput } from "./qapi_input.ts";

// A string literal in `new URL(...)` so the bundler (tools/build.ts) finds the module.
const BLK_IOTHREAD_MODULE = new URL("../blk_iothread.ts", import.meta.url).href;

/** An `--object iothread` as given. */
export interface IOThreadSpec {
  id: string;
  /** QEMU's poll-max-ns (default 32768). */
  pollMaxNs: number;
  /** QEMU's aio-max-batch; default ours (4), see DEFAULT_AIO_MAX_BATCH. */
  aioMaxBatch: number;
  /** QEMU's poll-grow (0: double) and poll-shrink (0: reset); default 0. */
  pollGrow?: number;
  pollShrink?: number;
  /**
   * Not an `--object` key: what the host's short options share between the
   * IOThreads of their one export (its range-lock table, a writable qcow2's
   * metadata owner), given to the thread at start (dataplane/host_export.ts).
   */
  data?: BlkThreadData;
}

/** The `qom-type`s `--object` knows. */
export const OBJECT_TYPES = ["iothread"] as const;

/**
 * Parses an `--object` / `object-add` object (`qom-type` included).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseObject } from "./iothread_object.ts";
 * assert.deepEqual(parseObject({ "qom-type": "iothread", id: "io0", "poll-max-ns": "0" }, true), {
 *   id: "io0", pollMaxNs: 0, aioMaxBatch: 4,
 * });
 * ```
 */
export function parseObject(obj: OptionObject, keyval: boolean): IOThreadSpec {
  const input = new QapiInput(obj, keyval);
  input.enum("qom-type", OBJECT_TYPES, true);
  const id = input.str("id", true);
  if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) {
    throw new DaemonError(`Parameter 'id' expects an identifier`);
  }
  const pollMaxNs = input.int("poll-max-ns", Number.MIN_SAFE_INTEGER) ?? 32768;
  if (pollMaxNs < 0) {
    throw new DaemonError("poll-max-ns value must be in range [0, 9223372036854775807]");
  }
  const aioMaxBatch = input.int("aio-max-batch", Number.MIN_SAFE_INTEGER) ?? DEFAULT_AIO_MAX_BATCH;
  if (aioMaxBatch < 0 || aioMaxBatch > 1024) {
    throw new DaemonError("aio-max-batch value must be in range [0, 1024]");
  }
  const pollGrow = input.int("poll-grow", Number.MIN_SAFE_INTEGER);
  const pollShrink = input.int("poll-shrink", Number.MIN_SAFE_INTEGER);
  for (const [name, v] of [["poll-grow", pollGrow], ["poll-shrink", pollShrink]] as const) {
    if (v !== undefined && v < 0) {
      throw new DaemonError(`${name} value must be in range [0, 9223372036854775807]`);
    }
  }
  input.end();
  const spec: IOThreadSpec = { id, pollMaxNs, aioMaxBatch };
  if (pollGrow) spec.pollGrow = pollGrow; // 0 is QEMU's "default"
  if (pollShrink) spec.pollShrink = pollShrink;
  return spec;
}

/**
 * What a device needs of its IOThread, scoped to one export: every call
 * carries `export: id` so blk_iothread.ts picks that export's state.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ExportThread } from "./iothread_object.ts";
 * const seen: unknown[] = [];
 * const fake = { name: "io0", call: <T>(_f: string, a?: unknown) => (seen.push(a), Promise.resolve(0 as T)) };
 * await new ExportThread(fake, "e0").call("blkStats");
 * assert.deepEqual(seen, [{ export: "e0" }]);
 * ```
 */
export class ExportThread {
  readonly #thread: Pick<IOThread, "call" | "name">;
  readonly exportId: string;
  constructor(thread: Pick<IOThread, "call" | "name">, exportId: string) {
    this.#thread = thread;
    this.exportId = exportId;
  }
  get name(): string {
    return this.#thread.name;
  }
  call<T>(fn: string, args?: unknown): Promise<T> {
    const a = typeof args === "object" && args !== null ? args : {};
    return this.#thread.call<T>(fn, { ...a, export: this.exportId });
  }
}

/**
 * A running `--object iothread`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IOThreadObject } from "./iothread_object.ts";
 * const io = await IOThreadObject.start({ id: "io0", pollMaxNs: 0, aioMaxBatch: 4 });
 * assert(await io.threadId() > 0);
 * await io.stop();
 * ```
 */
export class IOThreadObject {
  readonly spec: IOThreadSpec;
  readonly thread: IOThread;
  /** Exports running in it. */
  readonly users = new Set<string>();

  private constructor(spec: IOThreadSpec, thread: IOThread) {
    this.spec = spec;
    this.thread = thread;
  }

  /** Starts the Worker (~30 ms). */
  static async start(spec: IOThreadSpec): Promise<IOThreadObject> {
    const thread = await IOThread.start({
      name: spec.id,
      modules: [BLK_IOTHREAD_MODULE],
      pollMaxNs: spec.pollMaxNs,
      aioMaxBatch: spec.aioMaxBatch,
      pollGrow: spec.pollGrow,
      pollShrink: spec.pollShrink,
      data: spec.data,
    });
    return new IOThreadObject(spec, thread);
  }

  #tid: Promise<number> | null = null;
  readonly #loads = new Map<string, Promise<void>>();

  /**
   * Imports `module` in the thread once (IOThread.load): what only some
   * exports need, such as the NBD export's side (dataplane/nbd/), which a
   * thread serving vhost-user-blk alone never compiles. A failed load is
   * tried again by the next caller.
   */
  load(module: string): Promise<void> {
    let p = this.#loads.get(module);
    if (p === undefined) {
      p = this.thread.load([module]);
      p.catch(() => this.#loads.delete(module));
      this.#loads.set(module, p);
    }
    return p;
  }

  /** The thread's kernel thread id (asked once). */
  threadId(): Promise<number> {
    this.#tid ??= this.thread.call<number>("blkThreadId");
    return this.#tid;
  }

  /** Stops the Worker (its exports must be gone). */
  async stop(): Promise<void> {
    await this.thread.stop();
  }
}
