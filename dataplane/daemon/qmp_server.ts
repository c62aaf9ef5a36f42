/**
 * The QMP monitor on a `--chardev socket,server=on` (QEMU docs/interop/qmp-spec.rst):
 * a greeting with the version and capabilities, capabilities negotiation
 * (`qmp_capabilities`), then one JSON command object per line answered with
 * `{"return": ...}` or `{"error": {"class", "desc"}}` (with the command's
 * `id` echoed), and asynchronous events (`{"event", "data", "timestamp"}`).
 *
 * It runs on the main thread's AioContext: a non-blocking listening socket,
 * one client at a time (as a QEMU socket chardev), a line buffer bounded to
 * {@link QMP_MAX_LINE} bytes (a longer line gets an error and is skipped to
 * its newline), commands run one after another in arrival order, and
 * reading stops while too much output waits for a client that does not
 * read. Deliberate difference: QEMU's parser is a streaming JSON lexer (an
 * object may span lines); here each line is one JSON document.
 *
 * @module
 */

import {
  accept4,
  bindUnix,
  close,
  listen,
  recvMsg,
  sendMsg,
  SOCK_NONBLOCK,
  socketUnix,
  WOULD_BLOCK,
} from "../../sys/mod.ts";
import { DaemonError } from "./qapi_input.ts";

/** Longest command line taken (bytes, newline excluded). */
export const QMP_MAX_LINE = 1 << 20;

/** Output bytes waiting for the client past which input is no longer read. */
const OUTPUT_HIGH_WATER = 4 << 20;

/** Lines read ahead of the command being run. */
const MAX_PENDING_LINES = 64;

/** What the server needs of its event loop. */
export interface QmpWatcher {
  setFdHandler(fd: number, h: { read?(): void; write?(): void } | null): void;
}

/** The commands behind the protocol (qmp_commands.ts). */
export interface QmpDispatcher {
  /** The greeting's `version` object. */
  version(): unknown;
  /** Runs one command; throws {@link DaemonError} for an error reply. */
  execute(name: string, args: Record<string, unknown>): unknown | Promise<unknown>;
}

/** Options of a {@link QmpServer}. */
export interface QmpServerOptions {
  /** Indent replies (`--monitor pretty=on`). */
  pretty?: boolean;
  log?: (line: string) => void;
}

/**
 * A QMP monitor listening on a Unix socket.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { QmpServer } from "./qmp_server.ts";
 * const dir = Deno.makeTempDirSync();
 * const ctx = new AioContext();
 * const qmp = QmpServer.listen(`${dir}/qmp.sock`, ctx, {
 *   version: () => ({ qemu: { major: 7, minor: 2, micro: 0 }, package: "" }),
 *   execute: () => ({}),
 * });
 * const loop = (async () => { while (!qmp.closed) await ctx.pollAsync(); })();
 * const conn = await Deno.connect({ transport: "unix", path: `${dir}/qmp.sock` });
 * const buf = new Uint8Array(4096);
 * const n = await conn.read(buf);
 * assert.match(new TextDecoder().decode(buf.subarray(0, n!)), /"QMP"/);
 * conn.close();
 * qmp.close();
 * ctx.notify();
 * await loop;
 * ctx.close();
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export class QmpServer {
  readonly path: string;
  readonly #fd: number;
  readonly #watcher: QmpWatcher;
  readonly #dispatch: QmpDispatcher;
  readonly #opts: QmpServerOptions;
  #client: QmpClient | null = null;
  #closed = false;
  readonly #connected = Promise.withResolvers<void>();

  private constructor(
    path: string,
    fd: number,
    watcher: QmpWatcher,
    dispatch: QmpDispatcher,
    opts: QmpServerOptions,
  ) {
    this.path = path;
    this.#fd = fd;
    this.#watcher = watcher;
    this.#dispatch = dispatch;
    this.#opts = opts;
  }

  /** Binds `path` (a stale socket file there is replaced), listens, starts accepting. */
  static listen(
    path: string,
    watcher: QmpWatcher,
    dispatch: QmpDispatcher,
    opts: QmpServerOptions = {},
  ): QmpServer {
    try {
      if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
    } catch { /* none */ }
    const fd = socketUnix(SOCK_NONBLOCK);
    try {
      bindUnix(fd, path);
      listen(fd, 1);
    } catch (e) {
      close(fd);
      throw e;
    }
    const s = new QmpServer(path, fd, watcher, dispatch, opts);
    s.#watchListen();
    return s;
  }

  /** Resolves once a client has connected (`wait=on`). */
  get connected(): Promise<void> {
    return this.#connected.promise;
  }

  get closed(): boolean {
    return this.#closed;
  }

  #watchListen(): void {
    this.#watcher.setFdHandler(this.#fd, { read: () => this.#accept() });
  }

  #accept(): void {
    if (this.#closed || this.#client !== null) return;
    let fd: number;
    try {
      fd = accept4(this.#fd, SOCK_NONBLOCK);
    } catch (e) {
      this.#opts.log?.(`monitor: accept: ${(e as Error).message}`);
      return;
    }
    if (fd === WOULD_BLOCK) return;
    this.#watcher.setFdHandler(this.#fd, null); // one client at a time
    this.#client = new QmpClient(fd, this.#watcher, this.#dispatch, this.#opts, () => {
      this.#client = null;
      if (!this.#closed) {
        this.#watchListen();
        this.#accept();
      }
    });
    this.#connected.resolve();
  }

  /** Sends an event to the client, if one has negotiated capabilities. */
  event(name: string, data?: Record<string, unknown>): void {
    this.#client?.event(name, data);
  }

  /** Disconnects the client, stops listening, removes the socket file. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#client?.close();
    this.#watcher.setFdHandler(this.#fd, null);
    close(this.#fd);
    try {
      Deno.removeSync(this.path);
    } catch { /* gone */ }
  }
}

type ReplyJson = Record<string, unknown>;

/** One connected monitor client. */
class QmpClient {
  readonly #fd: number;
  readonly #watcher: QmpWatcher;
  readonly #dispatch: QmpDispatcher;
  readonly #opts: QmpServerOptions;
  readonly #onClose: () => void;
  readonly #buf = new Uint8Array(65536);
  readonly #enc = new TextEncoder();
  readonly #dec = new TextDecoder();
  /** Bytes of the line being received. */
  #partial: Uint8Array[] = [];
  #partialLen = 0;
  /** Discarding the rest of an over-long line. */
  #skipping = false;
  readonly #lines: string[] = [];
  #out: Uint8Array[] = [];
  #outLen = 0;
  #running = false;
  #negotiated = false;
  #closed = false;
  #eof = false;

  constructor(
    fd: number,
    watcher: QmpWatcher,
    dispatch: QmpDispatcher,
    opts: QmpServerOptions,
    onClose: () => void,
  ) {
    this.#fd = fd;
    this.#watcher = watcher;
    this.#dispatch = dispatch;
    this.#opts = opts;
    this.#onClose = onClose;
    this.#send({ QMP: { version: dispatch.version(), capabilities: [] } });
    this.#watch();
  }

  /** Watches for input unless back-pressure holds it, and for output room while some waits. */
  #watch(): void {
    if (this.#closed) return;
    const wantRead = !this.#eof && this.#lines.length < MAX_PENDING_LINES &&
      this.#outLen < OUTPUT_HIGH_WATER;
    const wantWrite = this.#outLen > 0;
    if (!wantRead && !wantWrite) {
      this.#watcher.setFdHandler(this.#fd, null);
      return;
    }
    this.#watcher.setFdHandler(this.#fd, {
      read: wantRead ? () => this.#onReadable() : undefined,
      write: wantWrite ? () => this.#flush() : undefined,
    });
  }

  #onReadable(): void {
    for (;;) {
      if (this.#closed || this.#lines.length >= MAX_PENDING_LINES) break;
      let n: number;
      try {
        n = recvMsg(this.#fd, this.#buf, 0).n;
      } catch {
        this.close();
        return;
      }
      if (n === WOULD_BLOCK) break;
      if (n === 0) {
        this.#eof = true;
        if (!this.#running && this.#lines.length === 0) {
          this.close();
          return;
        }
        break;
      }
      this.#take(this.#buf.subarray(0, n));
    }
    this.#watch();
    void this.#run();
  }

  /** Splits received bytes into lines, bounding the one being received. */
  #take(bytes: Uint8Array): void {
    let start = 0;
    for (;;) {
      const nl = bytes.indexOf(10, start);
      const piece = bytes.subarray(start, nl < 0 ? bytes.length : nl);
      if (!this.#skipping) {
        if (this.#partialLen + piece.length > QMP_MAX_LINE) {
          this.#skipping = true;
          this.#partial = [];
          this.#partialLen = 0;
          this.#send(errorReply(`QMP input line longer than ${QMP_MAX_LINE} bytes: skipped`));
        } else if (piece.length > 0) {
          this.#partial.push(piece.slice());
          this.#partialLen += piece.length;
        }
      }
      if (nl < 0) return;
      if (!this.#skipping) {
        const line = this.#dec.decode(concat(this.#partial, this.#partialLen)).trim();
        if (line !== "") this.#lines.push(line);
      }
      this.#skipping = false;
      this.#partial = [];
      this.#partialLen = 0;
      start = nl + 1;
    }
  }

  async #run(): Promise<void> {
    if (this.#running) return;
    this.#running = true;
    while (!this.#closed && this.#lines.length > 0) {
      const line = this.#lines.shift()!;
      const reply = await this.#handle(line);
      this.#send(reply);
      this.#watch();
    }
    this.#running = false;
    if (this.#eof && !this.#closed && this.#outLen === 0) this.close();
  }

  async #handle(line: string): Promise<ReplyJson> {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch (e) {
      return errorReply(`JSON parse error, ${(e as Error).message}`);
    }
    if (typeof msg !== "object" || msg === null || Array.isArray(msg)) {
      return errorReply("QMP input must be a JSON object");
    }
    const m = msg as Record<string, unknown>;
    const id = m.id;
    const withId = (r: ReplyJson): ReplyJson => (id === undefined ? r : { ...r, id });
    for (const k of Object.keys(m)) {
      if (k !== "execute" && k !== "arguments" && k !== "id") {
        return withId(errorReply(`QMP input member '${k}' is unexpected`));
      }
    }
    if (m.execute === undefined) {
      return withId(errorReply("QMP input lacks member 'execute'"));
    }
    if (typeof m.execute !== "string") {
      return withId(errorReply("QMP input member 'execute' must be a string"));
    }
    const args = m.arguments ?? {};
    if (typeof args !== "object" || args === null || Array.isArray(args)) {
      return withId(errorReply("QMP input member 'arguments' must be an object"));
    }
    const name = m.execute;
    if (name === "qmp_capabilities") {
      if (this.#negotiated) {
        return withId(errorReply(
          "Capabilities negotiation is already complete, command ignored",
          "CommandNotFound",
        ));
      }
      const enable = (args as Record<string, unknown>).enable;
      if (Array.isArray(enable) && enable.length > 0) {
        return withId(errorReply(`Capability '${enable[0]}' not available`));
      }
      this.#negotiated = true;
      return withId({ return: {} });
    }
    if (!this.#negotiated) {
      return withId(errorReply(
        "Expecting capabilities negotiation with 'qmp_capabilities'",
        "CommandNotFound",
      ));
    }
    try {
      const ret = await this.#dispatch.execute(name, args as Record<string, unknown>);
      return withId({ return: ret ?? {} });
    } catch (e) {
      if (e instanceof DaemonError) return withId(errorReply(e.message, e.kind));
      this.#opts.log?.(`monitor: ${name}: ${(e as Error).stack ?? e}`);
      return withId(errorReply((e as Error).message ?? String(e)));
    }
  }

  event(name: string, data?: Record<string, unknown>): void {
    if (!this.#negotiated || this.#closed) return;
    const now = Date.now();
    const ev: ReplyJson = {
      timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 },
      event: name,
    };
    if (data !== undefined) ev.data = data;
    this.#send(ev);
    this.#watch();
  }

  #send(obj: ReplyJson): void {
    if (this.#closed) return;
    const text = this.#opts.pretty ? JSON.stringify(obj, null, 4) : JSON.stringify(obj);
    const bytes = this.#enc.encode(text + "\r\n");
    this.#out.push(bytes);
    this.#outLen += bytes.length;
    this.#flush();
  }

  #flush(): void {
    while (this.#out.length > 0 && !this.#closed) {
      const head = this.#out[0];
      let n: number;
      try {
        n = sendMsg(this.#fd, head);
      } catch {
        this.close(); // EPIPE, ECONNRESET: the client left
        return;
      }
      if (n === WOULD_BLOCK) break;
      this.#outLen -= n;
      if (n === head.length) this.#out.shift();
      else this.#out[0] = head.subarray(n);
    }
    this.#watch();
    if (this.#eof && !this.#running && this.#lines.length === 0 && this.#outLen === 0) {
      this.close();
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#watcher.setFdHandler(this.#fd, null);
    close(this.#fd);
    this.#out = [];
    this.#outLen = 0;
    this.#onClose();
  }
}

function concat(parts: Uint8Array[], len: number): Uint8Array {
  if (parts.length === 1) return parts[0];
  const out = new Uint8Array(len);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

function errorReply(desc: string, cls = "GenericError"): ReplyJson {
  return { error: { class: cls, desc } };
}
