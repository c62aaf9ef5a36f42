/**
 * The vhost-user front-end's control channel (what QEMU's hw/virtio/vhost-user.c
 * does): connect to a back-end's socket, send requests with fds, read
 * replies, and REPLY_ACK. Asynchronous on a non-blocking socket, so the
 * back-end may run in the same thread (tests) or in another process.
 *
 * @module
 */

import {
  close,
  connectUnix,
  Epoll,
  EPOLLIN,
  recvMsg,
  sendMsg,
  setNonBlocking,
  socketUnix,
  WOULD_BLOCK,
} from "../sys/mod.ts";
import {
  decodeHeader,
  decodePayload,
  encodeMessage,
  requestName,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
  type VhostUserPayload,
  type VhostUserPayloadKind,
} from "../vhost_user/mod.ts";

/**
 * A front-end failure: the back-end closed the socket, sent a malformed or
 * unexpected reply, NACKed a request (`ackCode` non-zero) or timed out.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { FrontendError } from "./frontend.ts";
 * const e = new FrontendError("nack", "SET_MEM_TABLE failed", 22);
 * assert.equal(e.kind, "nack");
 * assert.equal(e.ackCode, 22);
 * ```
 */
export class FrontendError extends Error {
  /** What went wrong. */
  readonly kind: "closed" | "badReply" | "nack" | "timeout";
  /** The non-zero REPLY_ACK value for `nack`. */
  readonly ackCode: number;

  constructor(kind: FrontendError["kind"], message: string, ackCode = 0) {
    super(`vhost-user front-end: ${kind}: ${message}`);
    this.name = "FrontendError";
    this.kind = kind;
    this.ackCode = ackCode;
  }
}

/** A reply: header flags and decoded payload. */
export interface FrontendReply {
  /** Header flags of the reply. */
  flags: number;
  /** Payload decoded as the expected kind, or `empty` when the back-end sent none. */
  payload: VhostUserPayload;
  /** Fds that came with the reply (GET_INFLIGHT_FD); the caller owns them. */
  fds: number[];
}

/**
 * One front-end connection.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VhostUserFrontend } from "./frontend.ts";
 * await assert.rejects(VhostUserFrontend.connect("/nonexistent/socket", 10), /ENOENT/);
 * ```
 */
export class VhostUserFrontend {
  /** The connected socket (non-blocking). */
  readonly fd: number;
  /** Per-reply timeout in milliseconds. */
  timeoutMs: number;
  /** Set NEED_REPLY on requests without a reply and wait for the ack (after REPLY_ACK was negotiated). */
  replyAck = false;
  readonly #epoll: Epoll;
  readonly #hdr = new Uint8Array(VHOST_USER_HDR_SIZE);
  #closed = false;

  private constructor(fd: number, timeoutMs: number) {
    this.fd = fd;
    this.timeoutMs = timeoutMs;
    this.#epoll = new Epoll(4);
    this.#epoll.add(fd, EPOLLIN);
  }

  /** Connects to the back-end at `path`; throws SysError (ENOENT, ECONNREFUSED...) on failure. */
  static connect(path: string, timeoutMs = 5000): Promise<VhostUserFrontend> {
    const fd = socketUnix();
    try {
      // Blocking connect (immediate for Unix sockets), then non-blocking I/O.
      connectUnix(fd, path);
      setNonBlocking(fd, true);
    } catch (err) {
      close(fd);
      return Promise.reject(err);
    }
    return Promise.resolve(new VhostUserFrontend(fd, timeoutMs));
  }

  /** Sends raw bytes with `fds` (tests use this for malformed messages). */
  async sendRaw(bytes: Uint8Array, fds: readonly number[] = []): Promise<void> {
    let off = 0;
    let first = true;
    const deadline = Date.now() + this.timeoutMs;
    while (off < bytes.byteLength) {
      const n = sendMsg(this.fd, bytes.subarray(off), first ? fds : []);
      if (n === WOULD_BLOCK) {
        if (Date.now() > deadline) throw new FrontendError("timeout", "socket stays full");
        await new Promise((r) => setTimeout(r, 1));
        continue;
      }
      first = false;
      off += n;
    }
  }

  /**
   * Sends `request` with `payload` and `fds`. If `replyKind` is given, waits
   * for the reply and decodes it as that kind (an empty reply is returned as
   * `empty`, which is how a failed GET_CONFIG looks). Otherwise, with
   * {@link replyAck}, sets NEED_REPLY and throws FrontendError("nack") when
   * the ack is non-zero.
   */
  async request(
    request: number,
    payload: VhostUserPayload,
    fds: readonly number[] = [],
    replyKind?: VhostUserPayloadKind,
  ): Promise<FrontendReply> {
    const wantAck = replyKind === undefined && this.replyAck;
    const flags = VHOST_USER_VERSION | (wantAck ? VHOST_USER_NEED_REPLY_MASK : 0);
    await this.sendRaw(encodeMessage(request, flags, payload), fds);
    if (replyKind !== undefined) return await this.readReply(request, replyKind);
    if (wantAck) {
      const r = await this.readReply(request, "u64");
      if (r.payload.kind === "u64" && r.payload.value !== 0n) {
        throw new FrontendError("nack", `${requestName(request)} failed`, Number(r.payload.value));
      }
      return r;
    }
    return { flags: 0, payload: { kind: "empty" }, fds: [] };
  }

  /** Reads one reply to `request`, decoded as `kind` (or `empty` if the back-end sent no payload). */
  async readReply(request: number, kind: VhostUserPayloadKind): Promise<FrontendReply> {
    const fds: number[] = [];
    try {
      return await this.#readReply(request, kind, fds);
    } catch (err) {
      for (const fd of fds) close(fd);
      throw err;
    }
  }

  async #readReply(
    request: number,
    kind: VhostUserPayloadKind,
    fds: number[],
  ): Promise<FrontendReply> {
    await this.#readExact(this.#hdr, fds);
    let h;
    try {
      h = decodeHeader(this.#hdr);
    } catch (err) {
      throw new FrontendError("badReply", (err as Error).message);
    }
    const body = new Uint8Array(h.size);
    await this.#readExact(body, fds);
    if (h.request !== request || (h.flags & VHOST_USER_REPLY_MASK) === 0) {
      throw new FrontendError(
        "badReply",
        `expected a reply to ${requestName(request)}, got ${requestName(h.request)} flags 0x${
          h.flags.toString(16)
        }`,
      );
    }
    if (h.size === 0 && kind !== "empty") {
      return { flags: h.flags, payload: { kind: "empty" }, fds };
    }
    try {
      return { flags: h.flags, payload: decodePayload(request, kind, body), fds };
    } catch (err) {
      throw new FrontendError("badReply", (err as Error).message);
    }
  }

  async #readExact(buf: Uint8Array, fds: number[]): Promise<void> {
    let got = 0;
    const deadline = Date.now() + this.timeoutMs;
    while (got < buf.byteLength) {
      const r = recvMsg(this.fd, buf.subarray(got), 4);
      fds.push(...r.fds);
      if (r.n === 0) throw new FrontendError("closed", "back-end closed the connection");
      if (r.n === WOULD_BLOCK) {
        const left = deadline - Date.now();
        if (left <= 0) throw new FrontendError("timeout", `no reply within ${this.timeoutMs} ms`);
        await this.#epoll.waitAsync(Math.min(left, 100));
        continue;
      }
      got += r.n;
    }
  }

  /** Whether the back-end has closed its end (EOF pending), without consuming data. */
  async waitClosed(timeoutMs = this.timeoutMs): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    const probe = new Uint8Array(1);
    for (;;) {
      const r = recvMsg(this.fd, probe, 4);
      for (const fd of r.fds) close(fd);
      if (r.n === 0) return true;
      if (r.n > 0) return false;
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await this.#epoll.waitAsync(Math.min(left, 100));
    }
  }

  /** Closes the socket; idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#epoll.close();
    close(this.fd);
  }
}
