/**
 * The vhost-user back-end's listening socket: serves one front-end at a time
 * and accepts the next after a disconnect (the back-end is reset in between),
 * like qemu-storage-daemon's vhost-user-blk export. Unlike it, a front-end
 * that has not sent SET_OWNER within `handshakeTimeoutMs` is disconnected,
 * so a silent client cannot keep the only slot; an owner keeps it until it
 * disconnects. accept4 failures (EMFILE...) pause accepting for a while
 * rather than spinning on the still-readable listening socket.
 *
 * Event-driven: the server registers its fds with an {@link FdWatcher} (an
 * `AioContext` fits: `setFdHandler(fd, { read })`), so the main thread's
 * event loop drives it; nothing here blocks.
 *
 * @module
 */

import {
  accept4,
  bindUnix,
  close,
  connectUnix,
  EADDRINUSE,
  ECONNREFUSED,
  EEXIST,
  ENOENT,
  fdTarget,
  listen,
  setNonBlocking,
  SOCK_NONBLOCK,
  socketUnix,
  SysError,
  WOULD_BLOCK,
} from "../sys/mod.ts";
import type { VhostUserBackend } from "./backend.ts";
import { VhostUserConnection } from "./connection.ts";

/** Whatever watches fds for readability: `AioContext.setFdHandler` has this shape. */
export interface FdWatcher {
  /** Call `handler.read()` whenever `fd` is readable; `null` stops watching. */
  setFdHandler(fd: number, handler: { read?(): void } | null): void;
}

/** Options of {@link VhostUserServer.listen}. */
export interface VhostUserServerOptions {
  /** Permission bits of the socket file (default 0o600: only our user may connect). */
  mode?: number;
  /** listen(2) backlog (default 1: one front-end at a time, others wait). */
  backlog?: number;
  /** Protocol errors, backend failures and disconnect reasons. */
  onError?: (err: Error) => void;
  /** A front-end connected. */
  onConnect?: (conn: VhostUserConnection) => void;
  /** The front-end disconnected and the backend was reset. */
  onDisconnect?: () => void;
  /**
   * A front-end that has not sent SET_OWNER this many milliseconds after it
   * was accepted is disconnected, so a client that connects and stays silent
   * (or never gets past feature negotiation) does not hold the only
   * connection slot forever (default 10000; 0: wait forever, as
   * qemu-storage-daemon does). Once SET_OWNER arrived the session belongs to
   * that front-end until it disconnects.
   */
  handshakeTimeoutMs?: number;
}

/** Default of {@link VhostUserServerOptions.handshakeTimeoutMs}. */
const VHOST_USER_HANDSHAKE_TIMEOUT_MS = 10_000;

/**
 * How long the listening socket rests after accept4 failed (EMFILE, ENFILE,
 * ENOBUFS, ENOMEM...). The pending connection stays in the backlog, so a
 * level-triggered watcher would report the fd readable again at once and the
 * loop would spin on the same error. Servers stop watching the listening
 * socket and retry after a delay instead (nginx disables its accept events
 * for `accept_mutex_delay` after EMFILE/ENFILE).
 */
const ACCEPT_RETRY_MS = 100;

/**
 * Prepares `path` for bind: a stale socket (nobody listening) is removed;
 * a live one is "in use" (EADDRINUSE); any other kind of file is never
 * removed (EEXIST).
 */
function clearStaleSocket(path: string): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return;
    throw err;
  }
  if (!info.isSocket) {
    throw new SysError("bind", EEXIST, `${path} exists and is not a socket; refusing to remove it`);
  }
  const probe = socketUnix();
  try {
    connectUnix(probe, path);
  } catch (err) {
    if (err instanceof SysError && (err.errno === ECONNREFUSED || err.errno === ENOENT)) {
      Deno.removeSync(path); // stale: its server is gone
      return;
    }
    throw err;
  } finally {
    close(probe);
  }
  throw new SysError("bind", EADDRINUSE, `socket in use: another process is listening on ${path}`);
}

/**
 * A listening vhost-user socket bound to one backend.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VhostUserServer, type FdWatcher } from "./server.ts";
 * import type { VhostUserBackend } from "./backend.ts";
 * const handlers = new Map<number, { read?(): void }>();
 * const watcher: FdWatcher = { setFdHandler: (fd, h) => h ? handlers.set(fd, h) : handlers.delete(fd) };
 * const dir = Deno.makeTempDirSync();
 * const server = VhostUserServer.listen(`${dir}/vhost.sock`, {} as VhostUserBackend, watcher);
 * assert(handlers.has(server.listenFd));
 * assert.equal(Deno.statSync(`${dir}/vhost.sock`).mode! & 0o777, 0o600);
 * await server.close();
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export class VhostUserServer {
  /** Socket path. */
  readonly path: string;
  /** The listening socket (non-blocking). */
  readonly listenFd: number;
  readonly #backend: VhostUserBackend;
  readonly #watcher: FdWatcher;
  readonly #opts: VhostUserServerOptions;
  #conn: VhostUserConnection | null = null;
  #closed = false;
  #acceptRetry: ReturnType<typeof setTimeout> | null = null;
  #handshakeTimer: ReturnType<typeof setTimeout> | null = null;
  /** Inode of the socket file we bound, so close() removes only that file. */
  readonly #ino: number | null;

  private constructor(
    path: string,
    fd: number,
    backend: VhostUserBackend,
    watcher: FdWatcher,
    opts: VhostUserServerOptions,
    ino: number | null,
  ) {
    this.path = path;
    this.#ino = ino;
    this.listenFd = fd;
    this.#backend = backend;
    this.#watcher = watcher;
    this.#opts = opts;
  }

  /**
   * Binds `path` (mode 0600 by default), listens, and starts watching for a
   * front-end. Throws SysError: EADDRINUSE ("socket in use") when another
   * process listens there, EEXIST when `path` is not a socket,
   * ENAMETOOLONG when it is over 107 bytes.
   */
  static listen(
    path: string,
    backend: VhostUserBackend,
    watcher: FdWatcher,
    opts: VhostUserServerOptions = {},
  ): VhostUserServer {
    clearStaleSocket(path);
    const fd = socketUnix(SOCK_NONBLOCK);
    let ino: number | null = null;
    let bound = false;
    try {
      bindUnix(fd, path);
      bound = true;
      // Before listen(): nobody can connect yet, so the umask window is harmless.
      Deno.chmodSync(path, opts.mode ?? 0o600);
      listen(fd, opts.backlog ?? 1);
      ino = Deno.lstatSync(path).ino;
    } catch (err) {
      close(fd);
      // Only what we created: a failed bind (a file that appeared after
      // clearStaleSocket looked) leaves the path to whoever owns it.
      if (bound) {
        try {
          Deno.removeSync(path);
        } catch { /* already gone */ }
      }
      throw err;
    }
    const server = new VhostUserServer(path, fd, backend, watcher, opts, ino);
    server.#watchListen();
    return server;
  }

  /**
   * Serves on a socket someone else bound and put in the listening state
   * (qemu-storage-daemon's `addr.type=fd`: an inherited fd). The server owns
   * the fd from now on (made non-blocking, closed by {@link close}); there is
   * no socket file to remove. Throws TypeError (fd is not a socket) or SysError
   * EINVAL (a socket that is not bound) before taking it.
   */
  static adopt(
    fd: number,
    backend: VhostUserBackend,
    watcher: FdWatcher,
    opts: VhostUserServerOptions = {},
  ): VhostUserServer {
    const target = fdTarget(fd);
    if (target === null || !target.startsWith("socket:")) {
      throw new TypeError(`fd ${fd} is not a socket (${target ?? "not open"})`);
    }
    // listen() again is a no-op on a listening socket and fails with EINVAL
    // on one that is not bound.
    listen(fd, opts.backlog ?? 1);
    setNonBlocking(fd, true);
    const server = new VhostUserServer("", fd, backend, watcher, opts, null);
    server.#watchListen();
    return server;
  }

  /** The current front-end connection, if any. */
  get connection(): VhostUserConnection | null {
    return this.#conn;
  }

  #watchListen(): void {
    this.#watcher.setFdHandler(this.listenFd, { read: () => this.#onListenReadable() });
  }

  #onListenReadable(): void {
    if (this.#conn || this.#closed || this.#acceptRetry !== null) return;
    let fd: number;
    try {
      fd = accept4(this.listenFd, SOCK_NONBLOCK);
    } catch (err) {
      this.#opts.onError?.(err instanceof Error ? err : new Error(String(err)));
      // Out of fds (or memory): rest, then try again; see ACCEPT_RETRY_MS.
      this.#watcher.setFdHandler(this.listenFd, null);
      this.#acceptRetry = setTimeout(() => {
        this.#acceptRetry = null;
        if (this.#closed || this.#conn) return;
        this.#watchListen();
        this.#onListenReadable();
      }, ACCEPT_RETRY_MS);
      return;
    }
    if (fd === WOULD_BLOCK) return;
    // One front-end at a time: stop accepting until this one leaves.
    this.#watcher.setFdHandler(this.listenFd, null);
    const handler = { read: () => conn.onReadable() };
    const conn: VhostUserConnection = new VhostUserConnection(fd, this.#backend, {
      onError: this.#opts.onError,
      detach: () => this.#watcher.setFdHandler(fd, null),
      onClose: () => this.#onConnectionClosed(conn),
      pauseReading: (paused) => this.#watcher.setFdHandler(fd, paused ? null : handler),
    });
    this.#conn = conn;
    this.#startHandshakeTimer(conn);
    this.#watcher.setFdHandler(fd, handler);
    this.#opts.onConnect?.(conn);
    conn.onReadable();
  }

  #startHandshakeTimer(conn: VhostUserConnection): void {
    const ms = this.#opts.handshakeTimeoutMs ?? VHOST_USER_HANDSHAKE_TIMEOUT_MS;
    if (!(ms > 0)) return;
    const timer = setTimeout(() => {
      this.#handshakeTimer = null;
      if (this.#conn !== conn || conn.owner || conn.closed) return;
      this.#opts.onError?.(
        new Error(`vhost-user front-end sent no SET_OWNER within ${ms} ms: disconnecting it`),
      );
      void conn.close();
    }, ms);
    Deno.unrefTimer(timer);
    this.#handshakeTimer = timer;
  }

  #clearTimers(): void {
    if (this.#handshakeTimer !== null) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
    if (this.#acceptRetry !== null) clearTimeout(this.#acceptRetry);
    this.#acceptRetry = null;
  }

  #onConnectionClosed(conn: VhostUserConnection): void {
    if (this.#handshakeTimer !== null) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
    if (this.#conn === conn) this.#conn = null;
    this.#opts.onDisconnect?.();
    if (this.#closed || this.#acceptRetry !== null) return;
    this.#watchListen();
    // A front-end may already be waiting in the backlog.
    this.#onListenReadable();
  }

  /**
   * Disconnects the front-end (resetting the backend), stops listening and
   * removes the socket file (only if it is still the one bound here).
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#clearTimers();
    this.#watcher.setFdHandler(this.listenFd, null);
    const conn = this.#conn;
    if (conn) await conn.close();
    close(this.listenFd);
    if (this.#ino === null) return; // adopted: no socket file of ours
    try {
      // Only our own socket: whatever replaced it since is not ours to remove.
      const st = Deno.lstatSync(this.path);
      if (st.isSocket && st.ino === this.#ino) Deno.removeSync(this.path);
    } catch { /* already gone */ }
  }
}
