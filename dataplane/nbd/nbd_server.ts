/**
 * `--nbd-server` / QMP `nbd-server-start`: the NBD server of the daemon
 * (QEMU's blockdev-nbd.c with nbd/server.c's negotiation). One listening
 * socket (Unix, TCP over IPv4 or IPv6, or an inherited fd) on the main thread's
 * AioContext; each accepted connection runs its handshake there
 * ({@link NbdHandshake}) and is then handed, fd and negotiated state, to the
 * IOThread of the export it picked, which serves its requests.
 *
 * @module
 */

import type { AioContext, AioTimer } from "../../aio/mod.ts";
import {
  accept4,
  bindUnix,
  close,
  fdTarget,
  listen,
  listenInet,
  setNonBlocking,
  setTcpNoDelay,
  SOCK_NONBLOCK,
  socketPort,
  socketUnix,
  WOULD_BLOCK,
} from "../../sys/mod.ts";
import { type NbdExportInfo, NbdHandshake } from "./nbd_handshake.ts";

/** Where the server listens (QEMU's SocketAddress, the kinds served here). */
export type NbdServerAddr =
  | { type: "unix"; path: string }
  | { type: "inet"; host: string; port: number }
  | { type: "fd"; fd: number };

/**
 * An `--nbd-server` as given.
 *
 * @example
 * ```ts
 * import type { NbdServerSpec } from "./nbd_server.ts";
 * const s: NbdServerSpec = { addr: { type: "inet", host: "127.0.0.1", port: 10809 }, maxConnections: 0 };
 * if (s.maxConnections !== 0) throw new Error();
 * ```
 */
export interface NbdServerSpec {
  addr: NbdServerAddr;
  /** Most clients at once, handshakes included (0: no limit, as QEMU's default). */
  maxConnections: number;
}

/**
 * What the server needs of an export: what to tell clients, and where to
 * send a client that picked it.
 *
 * @example
 * ```ts
 * import type { NbdServedExport } from "./nbd_server.ts";
 * const e: NbdServedExport = {
 *   info: { name: "d", description: "", size: 0, flags: 1, minBlockSize: 1,
 *     preferredBlockSize: 4096, maxBlockSize: 1 << 25 },
 *   clients: 0,
 *   attach: (fd) => void fd,
 * };
 * if (e.clients !== 0) throw new Error();
 * ```
 */
export interface NbdServedExport {
  readonly info: NbdExportInfo;
  /** Clients it serves now. */
  readonly clients: number;
  /** Takes over a client's fd (its handshake picked this export). */
  attach(fd: number, structured: boolean, baseAllocation?: boolean): void;
}

/** Pause after a failed accept (EMFILE...), as the vhost-user server's. */
const ACCEPT_RETRY_MS = 100;

/** Handshakes in progress at once, whatever max-connections says (memory bound). */
const MAX_HANDSHAKES = 256;

/**
 * A running NBD server.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { NbdServer } from "./nbd_server.ts";
 * const ctx = new AioContext();
 * const s = NbdServer.listen({ addr: { type: "inet", host: "127.0.0.1", port: 0 }, maxConnections: 0 }, ctx);
 * assert(s.port > 0);
 * s.close();
 * ctx.close();
 * ```
 */
export class NbdServer {
  readonly spec: NbdServerSpec;
  /** Exports by NBD name. */
  readonly exports = new Map<string, NbdServedExport>();
  /** The TCP port (inet: the one bound, useful with port 0), else 0. */
  readonly port: number;
  readonly #ctx: AioContext;
  readonly #fd: number;
  readonly #log: (line: string) => void;
  readonly #handshakes = new Set<NbdHandshake>();
  #closed = false;
  #accepted = 0;
  readonly #acceptRetry: AioTimer;

  private constructor(
    spec: NbdServerSpec,
    fd: number,
    ctx: AioContext,
    log: (line: string) => void,
  ) {
    this.spec = spec;
    this.#fd = fd;
    this.#ctx = ctx;
    this.#log = log;
    this.port = spec.addr.type === "inet" ? socketPort(fd) : 0;
    this.#acceptRetry = ctx.timerNew(() => {
      if (!this.#closed) ctx.setFdHandler(fd, { read: () => this.#onAccept() });
    });
    ctx.setFdHandler(fd, { read: () => this.#onAccept() });
  }

  /** Binds and listens; throws SysError (address in use, bad path...). */
  static listen(
    spec: NbdServerSpec,
    ctx: AioContext,
    log: (line: string) => void = () => {},
  ): NbdServer {
    const a = spec.addr;
    let fd: number;
    if (a.type === "inet") {
      fd = listenInet(a.host, a.port, SOCK_NONBLOCK, 64);
    } else if (a.type === "unix") {
      try {
        if (Deno.lstatSync(a.path).isSocket) Deno.removeSync(a.path); // as QEMU: a stale socket
      } catch { /* none */ }
      fd = socketUnix(SOCK_NONBLOCK);
      try {
        bindUnix(fd, a.path);
        listen(fd, 64);
      } catch (e) {
        close(fd);
        throw e;
      }
    } else {
      const target = fdTarget(a.fd);
      if (target === null || !target.startsWith("socket:")) {
        throw new TypeError(`fd ${a.fd} is not a socket (${target ?? "not open"})`);
      }
      listen(a.fd, 64);
      setNonBlocking(a.fd, true);
      fd = a.fd;
    }
    return new NbdServer(spec, fd, ctx, log);
  }

  /** Connections accepted since the start. */
  get accepted(): number {
    return this.#accepted;
  }

  /** Clients connected now (handshakes included). */
  get connections(): number {
    let n = this.#handshakes.size;
    for (const e of this.exports.values()) n += e.clients;
    return n;
  }

  /** Publishes an export under its NBD name. */
  addExport(exp: NbdServedExport): void {
    if (this.exports.has(exp.info.name)) {
      throw new Error(`NBD server already has export named '${exp.info.name}'`);
    }
    this.exports.set(exp.info.name, exp);
  }

  /** Unpublishes an export: new clients no longer find it. */
  removeExport(name: string): void {
    this.exports.delete(name);
  }

  #onAccept(): void {
    for (let i = 0; i < 16 && !this.#closed; i++) {
      let fd: number;
      try {
        fd = accept4(this.#fd, SOCK_NONBLOCK);
      } catch (e) {
        // Out of fds (or memory): the listener stays readable, so rest
        // before trying again instead of spinning.
        this.#log(`nbd-server: accept: ${(e as Error).message}`);
        this.#ctx.setFdHandler(this.#fd, null);
        this.#acceptRetry.modNs(this.#ctx.now() + ACCEPT_RETRY_MS * 1e6);
        return;
      }
      if (fd === WOULD_BLOCK) return;
      this.#accepted++;
      const max = this.spec.maxConnections;
      if (
        (max > 0 && this.connections >= max) || this.#handshakes.size >= MAX_HANDSHAKES
      ) {
        this.#log("nbd-server: too many connections: refused one");
        close(fd);
        continue;
      }
      setTcpNoDelay(fd);
      let hs: NbdHandshake | null = null;
      hs = new NbdHandshake(this.#ctx, fd, {
        lookup: (name) => this.exports.get(name)?.info,
        list: () => [...this.exports.values()].map((e) => e.info),
      }, {
        onDone: (r, reason) => {
          if (hs !== null) this.#handshakes.delete(hs);
          if (r === null) {
            this.#log(`nbd-server: client dropped during the handshake: ${reason}`);
            return;
          }
          const exp = this.exports.get(r.exportName);
          if (exp === undefined || this.#closed) {
            close(r.fd);
            return;
          }
          exp.attach(r.fd, r.structured, r.baseAllocation ?? false);
        },
      });
      this.#handshakes.add(hs);
    }
  }

  /** Stops listening and drops clients still in their handshake. Exports stop on their own. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#acceptRetry.del();
    this.#ctx.setFdHandler(this.#fd, null);
    close(this.#fd);
    for (const h of [...this.#handshakes]) h.abort();
    if (this.spec.addr.type === "unix") {
      try {
        Deno.removeSync(this.spec.addr.path);
      } catch { /* already gone */ }
    }
  }
}
