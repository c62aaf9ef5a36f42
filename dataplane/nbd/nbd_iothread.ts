/**
 * The functions the main thread runs in an NBD export's IOThread through
 * `IOThread.call` (loaded into every daemon IOThread beside
 * blk_iothread.ts): open the export's BlockBackend, take over a client's
 * socket once its handshake is done, report counters, close. Each call
 * names its export (`args.export`); fds travel as numbers (they are
 * process-wide).
 *
 * @module
 */

import type { AioContext } from "../../aio/mod.ts";
import { BlockBackend, type BlockOptions } from "../../block/mod.ts";
import { close, eventfdWrite } from "../../sys/mod.ts";
import { NbdSession, type NbdSessionStats } from "./nbd_session.ts";

interface NbdExportState {
  blk: BlockBackend;
  readOnly: boolean;
  writethrough: boolean;
  sessions: Set<NbdSession>;
  /** Counters of sessions that ended. */
  past: NbdSessionStats;
  /** eventfd of the main thread, written once per client that goes away. */
  clientGoneFd: number | null;
  log: string[];
}

const exports = new Map<string, NbdExportState>();

const LOG_MAX = 64;

/**
 * What {@link nbdOpen} learns about the node.
 *
 * @example
 * ```ts
 * import type { NbdImageInfo } from "./nbd_iothread.ts";
 * const i: NbdImageInfo = { length: 4096, requestAlignment: 1, readOnly: true };
 * if (!i.readOnly) throw new Error();
 * ```
 */
export interface NbdImageInfo {
  length: number;
  requestAlignment: number;
  readOnly: boolean;
}

/**
 * Counters of an export's clients (present and past) and the clients now connected.
 *
 * @example
 * ```ts
 * import type { NbdExportStats } from "./nbd_iothread.ts";
 * const s: NbdExportStats = { clients: 0, requests: 0, errors: 0, bytesRead: 0,
 *   bytesWritten: 0, readPauses: 0, log: [] };
 * if (s.clients !== 0) throw new Error();
 * ```
 */
export interface NbdExportStats extends NbdSessionStats {
  clients: number;
  /** Why clients went away since the last call (at most 64). */
  log: string[];
}

function need(args: { export: string }): NbdExportState {
  const s = exports.get(args.export);
  if (s === undefined) throw new Error(`NBD IOThread: export '${args.export}' is not open`);
  return s;
}

/**
 * Opens the export's BlockBackend in this thread.
 *
 * @example
 * ```ts ignore
 * const info = await thread.call<NbdImageInfo>("nbdOpen", { export: "e0", driver: "null-co" });
 * ```
 */
export async function nbdOpen(
  ctx: AioContext,
  args: BlockOptions & { export: string; clientGoneFd?: number; writethrough?: boolean },
): Promise<NbdImageInfo> {
  const { export: key, clientGoneFd, writethrough, ...opts } = args;
  if (exports.has(key)) throw new Error(`NBD IOThread: export '${key}' is already open`);
  const blk = await BlockBackend.open(ctx, opts);
  // A driver that can finish at once (null-co) may complete inside the
  // submitting call, as QEMU's coroutine exports see it: the session's
  // callbacks are safe there.
  blk.setInlineCompletion(true);
  if (exports.has(key)) {
    await blk.close();
    throw new Error(`NBD IOThread: export '${key}' is already open`);
  }
  exports.set(key, {
    blk,
    readOnly: blk.readOnly,
    writethrough: writethrough ?? false,
    sessions: new Set(),
    past: { requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0, readPauses: 0 },
    clientGoneFd: clientGoneFd ?? null,
    log: [],
  });
  return { length: blk.length, requestAlignment: blk.requestAlignment, readOnly: blk.readOnly };
}

/**
 * Takes over a client whose handshake picked this export: from now on this
 * thread owns `fd` and serves its requests.
 *
 * @example
 * ```ts ignore
 * await thread.call("nbdClientAdd", { export: "e0", fd, structured: true });
 * ```
 */
export function nbdClientAdd(
  ctx: AioContext,
  args: { export: string; fd: number; structured: boolean; baseAllocation?: boolean },
): void {
  const s = exports.get(args.export);
  if (s === undefined) {
    close(args.fd);
    throw new Error(`NBD IOThread: export '${args.export}' is not open`);
  }
  const session: NbdSession = new NbdSession(ctx, args.fd, s.blk, {
    structured: args.structured,
    baseAllocation: args.baseAllocation ?? false,
    readOnly: s.readOnly,
    writethrough: s.writethrough,
    onClose: (reason) => {
      s.sessions.delete(session);
      for (const k of Object.keys(s.past) as (keyof NbdSessionStats)[]) {
        s.past[k] += session.stats[k];
      }
      if (s.log.length < LOG_MAX) s.log.push(reason);
      if (s.clientGoneFd !== null) {
        try {
          eventfdWrite(s.clientGoneFd, 1);
        } catch { /* the main thread closed it: stopping */ }
      }
    },
  });
  s.sessions.add(session);
}

/**
 * The export's counters and connected clients.
 *
 * @example
 * ```ts ignore
 * const st = await thread.call<NbdExportStats>("nbdStats", { export: "e0" });
 * ```
 */
export function nbdStats(_ctx: AioContext, args: { export: string }): NbdExportStats {
  const s = need(args);
  const out: NbdExportStats = { ...s.past, clients: s.sessions.size, log: s.log };
  s.log = [];
  for (const c of s.sessions) {
    for (const k of Object.keys(s.past) as (keyof NbdSessionStats)[]) out[k] += c.stats[k];
  }
  return out;
}

/**
 * Re-reads the node's size after the main thread resized it; returns it.
 * Clients connected keep the size they were told; new ones see this one.
 *
 * @example
 * ```ts ignore
 * const length = await thread.call<number>("nbdResize", { export: "e0" });
 * ```
 */
export function nbdResize(_ctx: AioContext, args: { export: string }): number {
  return need(args).blk.refreshLength();
}

/**
 * Disconnects every client (their requests in flight complete first),
 * drains and closes the BlockBackend.
 *
 * @example
 * ```ts ignore
 * await thread.call("nbdClose", { export: "e0" });
 * ```
 */
export async function nbdClose(_ctx: AioContext, args: { export: string }): Promise<void> {
  const s = exports.get(args.export);
  if (s === undefined) return;
  exports.delete(args.export);
  s.clientGoneFd = null;
  await Promise.all([...s.sessions].map((c) => c.stop()));
  await s.blk.drain();
  await s.blk.close();
}
