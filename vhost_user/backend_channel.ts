/**
 * The back-end request channel (vhost-user.rst, "Back-end communication"):
 * a socket the front-end hands over with SET_BACKEND_REQ_FD once
 * VHOST_USER_PROTOCOL_F_BACKEND_REQ is negotiated, on which the back-end
 * sends requests of its own. Here only VHOST_USER_BACKEND_CONFIG_CHANGE_MSG
 * (the device config changed, e.g. the disk was resized: the front-end
 * re-reads it with GET_CONFIG and raises a config interrupt in the guest).
 *
 * The socket is the front-end's and untrusted: it is used non-blocking, a
 * full socket drops the message rather than block the main thread, and the
 * REPLY_ACK answer (when negotiated) is awaited by polling with a bound, so
 * a front-end that never answers costs a timeout, not a hang.
 *
 * @module
 */

import { close, fdTarget, recvMsg, sendMsg, setNonBlocking, WOULD_BLOCK } from "../sys/mod.ts";
import {
  VHOST_USER_BACKEND_CONFIG_CHANGE_MSG,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_VERSION,
} from "./constants.ts";
import { encodeMessage } from "./message.ts";

/** How long a REPLY_ACK on the back-end channel is waited for. */
export const BACKEND_REPLY_TIMEOUT_MS = 2000;

/**
 * One front-end's back-end request channel.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { close, recvMsg, socketpair } from "../sys/mod.ts";
 * import { VhostUserBackendChannel } from "./backend_channel.ts";
 * const [ours, theirs] = socketpair();
 * const ch = VhostUserBackendChannel.adopt(ours, false);
 * assert.equal(await ch.configChanged(), "sent");
 * const buf = new Uint8Array(64);
 * assert.equal(recvMsg(theirs, buf, 0).n, 12);
 * assert.equal(buf[0], 2); // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG
 * ch.close();
 * close(theirs);
 * ```
 */
export class VhostUserBackendChannel {
  readonly fd: number;
  /** Ask for a REPLY_ACK (the front-end negotiated VHOST_USER_PROTOCOL_F_REPLY_ACK). */
  readonly needReply: boolean;
  #closed = false;
  #busy: Promise<unknown> = Promise.resolve();

  private constructor(fd: number, needReply: boolean) {
    this.fd = fd;
    this.needReply = needReply;
  }

  /**
   * Takes ownership of the fd from SET_BACKEND_REQ_FD. Throws (closing
   * nothing: the caller still owns it) unless it is a socket.
   */
  static adopt(fd: number, needReply: boolean): VhostUserBackendChannel {
    const target = fdTarget(fd);
    if (target === null || !target.startsWith("socket:")) {
      throw new TypeError(`back-end request fd ${fd} is not a socket (${target ?? "closed"})`);
    }
    setNonBlocking(fd, true);
    return new VhostUserBackendChannel(fd, needReply);
  }

  /**
   * Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG. Resolves "sent" (no reply
   * asked), "acked" (the front-end answered 0), or why not: "full" (the
   * socket had no room), "nack" (a non-zero answer), "timeout", "closed".
   * Calls are serialised, so replies cannot be taken for another's.
   */
  configChanged(): Promise<"sent" | "acked" | "full" | "nack" | "timeout" | "closed"> {
    const run = this.#busy.then(async () => {
      const r = await this.#send(VHOST_USER_BACKEND_CONFIG_CHANGE_MSG);
      // A reply that did not come (or half did) leaves the stream out of step.
      if (r === "timeout" || r === "closed" || r === "nack") this.close();
      return r;
    });
    this.#busy = run.catch(() => {});
    return run;
  }

  async #send(request: number): Promise<"sent" | "acked" | "full" | "nack" | "timeout" | "closed"> {
    if (this.#closed) return "closed";
    const flags = VHOST_USER_VERSION | (this.needReply ? VHOST_USER_NEED_REPLY_MASK : 0);
    const msg = encodeMessage(request, flags, { kind: "empty" });
    let n: number;
    try {
      n = sendMsg(this.fd, msg);
    } catch {
      return "closed";
    }
    if (n === WOULD_BLOCK) return "full";
    if (n !== msg.length) return "closed"; // a 12-byte message split: the stream is unusable
    if (!this.needReply) return "sent";
    const reply = new Uint8Array(VHOST_USER_HDR_SIZE + 8);
    let got = 0;
    const end = Date.now() + BACKEND_REPLY_TIMEOUT_MS;
    while (got < reply.length) {
      if (this.#closed) return "closed";
      let r: number;
      try {
        r = recvMsg(this.fd, reply.subarray(got), 0).n;
      } catch {
        return "closed";
      }
      if (r === 0) return "closed";
      if (r === WOULD_BLOCK) {
        if (Date.now() > end) return "timeout";
        await new Promise((res) => setTimeout(res, 5));
        continue;
      }
      got += r;
    }
    const dv = new DataView(reply.buffer);
    if (dv.getUint32(0, true) !== request) return "nack";
    return dv.getBigUint64(VHOST_USER_HDR_SIZE, true) === 0n ? "acked" : "nack";
  }

  /** Closes the socket (idempotent). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      close(this.fd);
    } catch { /* already closed */ }
  }
}
