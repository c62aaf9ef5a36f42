/**
 * Why an NBD connection or handshake failed: the server's refusal (an
 * NBD_REP_ERR_* reply), a protocol violation (the server sent something
 * the protocol does not allow: a bad magic, an unknown cookie, a chunk
 * outside its request), a timeout, or an unusable address.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdError } from "./nbd_error.ts";
 * const e = new NbdError("protocol", "unknown cookie 7");
 * assert.equal(e.kind, "protocol");
 * assert.match(e.message, /unknown cookie/);
 * ```
 */
export class NbdError extends Error {
  override name = "NbdError";
  /** What went wrong. */
  readonly kind: NbdErrorKind;
  constructor(kind: NbdErrorKind, message: string) {
    super(message);
    this.kind = kind;
  }
}

/**
 * Kinds of {@link NbdError}: `refused` (the server said no, e.g. no such
 * export), `protocol` (the server broke the protocol), `unsupported` (a
 * server without what this client needs: oldstyle, no fixed newstyle, no
 * NBD_OPT_GO), `timeout`, `closed` (the client was closed), `address`.
 *
 * @example
 * ```ts
 * import type { NbdErrorKind } from "./nbd_error.ts";
 * const k: NbdErrorKind = "timeout";
 * ```
 */
export type NbdErrorKind =
  | "refused"
  | "protocol"
  | "unsupported"
  | "timeout"
  | "closed"
  | "address";
