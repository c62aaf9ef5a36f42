/**
 * Stream sockets for network protocols (the NBD export): TCP over IPv4
 * listeners, TCP_NODELAY, non-blocking receive into part of a buffer, and a
 * gathered send (sendmsg over a caller-built iovec array) that reports
 * "would block" instead of throwing.
 *
 * {@link recvInto} and {@link sendIov} are the per-request calls of a
 * socket served from an AioContext: they allocate nothing. The set-up calls
 * (socket, bind, getsockname) are control plane.
 *
 * @module
 */

import { libc } from "./libc.ts";
import { EAGAIN, EINTR, EINVAL } from "./errno.ts";
import { check, lastErrno, SysError } from "./sys_error.ts";
import { MSGHDR } from "./layout.ts";
import { MSG_NOSIGNAL, SOCK_CLOEXEC, SOCK_STREAM, WOULD_BLOCK } from "./socket.ts";

/** Address family: IPv4. */
export const AF_INET = 2;
/** Protocol level of TCP options. */
export const IPPROTO_TCP = 6;
/** TCP option: send small segments at once (no Nagle delay). */
export const TCP_NODELAY = 1;
/** Socket option: allow binding a port in TIME_WAIT. */
export const SO_REUSEADDR = 2;
/** send/recv flag: this call does not block, whatever the fd's mode. */
export const MSG_DONTWAIT = 0x40;

const SOCKADDR_IN_SIZE = 16;
const SOL_SOCKET = 1;

/**
 * Parses a dotted-quad IPv4 address ("localhost" is 127.0.0.1). Throws
 * SysError(EINVAL) for anything else (names are not resolved here).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseIpv4 } from "./stream_socket.ts";
 * assert.deepEqual([...parseIpv4("127.0.0.1")], [127, 0, 0, 1]);
 * ```
 */
export function parseIpv4(host: string): Uint8Array {
  const h = host === "localhost" ? "127.0.0.1" : host;
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(h);
  const parts = m ? m.slice(1).map(Number) : [];
  if (!m || parts.some((p) => p > 255)) {
    throw new SysError("inet_aton", EINVAL, `not an IPv4 address: ${host}`);
  }
  return new Uint8Array(parts);
}

function sockaddrIn(host: string, port: number): Uint8Array<ArrayBuffer> {
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new SysError("sockaddr_in", EINVAL, `bad port ${port}`);
  }
  const sa = new Uint8Array(SOCKADDR_IN_SIZE);
  const v = new DataView(sa.buffer);
  v.setUint16(0, AF_INET, true);
  v.setUint16(2, port); // network order
  sa.set(parseIpv4(host), 4);
  return sa;
}

/**
 * A listening TCP socket on `host:port` (IPv4; port 0 picks a free one,
 * see {@link socketPort}), SO_REUSEADDR, close-on-exec, plus `flags`
 * (e.g. SOCK_NONBLOCK).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { close, listenInet, socketPort } from "./mod.ts";
 * const fd = listenInet("127.0.0.1", 0);
 * assert(socketPort(fd) > 0);
 * close(fd);
 * ```
 */
export function listenInet(host: string, port: number, flags = 0, backlog = 16): number {
  const sa = sockaddrIn(host, port);
  const fd = check("socket", libc.socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | flags, 0));
  try {
    const one = new Int32Array([1]);
    check(
      "setsockopt",
      libc.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, new Uint8Array(one.buffer), 4),
    );
    check("bind", libc.bind(fd, sa, SOCKADDR_IN_SIZE), `${host}:${port}`);
    check("listen", libc.listen(fd, backlog));
  } catch (e) {
    libc.close(fd);
    throw e;
  }
  return fd;
}

/**
 * The local port of an IPv4 socket (getsockname).
 *
 * @example
 * ```ts
 * import { close, listenInet, socketPort } from "./mod.ts";
 * const fd = listenInet("127.0.0.1", 0);
 * if (socketPort(fd) === 0) throw new Error("no port");
 * close(fd);
 * ```
 */
export function socketPort(fd: number): number {
  const sa = new Uint8Array(128);
  const len = new Uint32Array([sa.byteLength]);
  check("getsockname", libc.getsockname(fd, sa, new Uint8Array(len.buffer)));
  return new DataView(sa.buffer).getUint16(2);
}

/**
 * Sets TCP_NODELAY on a TCP socket; does nothing on a Unix socket (EOPNOTSUPP
 * is ignored, so callers need not know the family).
 *
 * @example
 * ```ts
 * import { close, socketpair, setTcpNoDelay } from "./mod.ts";
 * const [a, b] = socketpair();
 * setTcpNoDelay(a); // a Unix socket: ignored
 * close(a); close(b);
 * ```
 */
export function setTcpNoDelay(fd: number): void {
  const one = new Int32Array([1]);
  libc.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, new Uint8Array(one.buffer), 4);
}

/**
 * recv(2) of at most `length` bytes into `buf` at `offset`, never blocking
 * (MSG_DONTWAIT). Returns the byte count (0: the peer closed), or
 * {@link WOULD_BLOCK}. Hot path: allocates nothing but a subarray view.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { close, recvInto, sendMsg, socketpair, WOULD_BLOCK } from "./mod.ts";
 * const [a, b] = socketpair();
 * const buf = new Uint8Array(8);
 * assert.equal(recvInto(b, buf, 4, 4), WOULD_BLOCK);
 * sendMsg(a, new Uint8Array([7]));
 * assert.equal(recvInto(b, buf, 4, 4), 1);
 * assert.equal(buf[4], 7);
 * close(a); close(b);
 * ```
 */
export function recvInto(fd: number, buf: Uint8Array, offset: number, length: number): number {
  if (offset < 0 || length < 0 || offset + length > buf.byteLength) {
    throw new RangeError("recvInto: range outside the buffer");
  }
  const view = offset === 0 ? buf : buf.subarray(offset);
  for (;;) {
    const r = Number(libc.recv(fd, view, BigInt(length), MSG_DONTWAIT));
    if (r >= 0) return r;
    const e = lastErrno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return WOULD_BLOCK;
    throw new SysError("recv", e);
  }
}

/**
 * sendmsg(2) of a gathered iovec (`msghdr` is a caller-built `struct msghdr`
 * whose msg_iov/msg_iovlen point at a caller-built iovec array), never
 * blocking and without SIGPIPE. Returns the bytes sent (possibly fewer than
 * asked) or {@link WOULD_BLOCK}. Hot path: allocates nothing.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { addressOf, close, IOVEC, MSGHDR, recvInto, sendIov, socketpair } from "./mod.ts";
 * const [a, b] = socketpair();
 * const data = new Uint8Array([1, 2, 3]);
 * const iov = new BigUint64Array(IOVEC.size / 8);
 * iov[0] = BigInt(addressOf(data)); iov[1] = 3n;
 * const hdr = new BigUint64Array(MSGHDR.size / 8);
 * hdr[MSGHDR.msg_iov / 8] = BigInt(addressOf(iov)); hdr[MSGHDR.msg_iovlen / 8] = 1n;
 * assert.equal(sendIov(a, new Uint8Array(hdr.buffer)), 3);
 * assert.equal(recvInto(b, new Uint8Array(3), 0, 3), 3);
 * close(a); close(b);
 * ```
 */
export function sendIov(fd: number, msghdr: Uint8Array): number {
  if (msghdr.byteLength < MSGHDR.size) throw new RangeError("sendIov: short msghdr");
  for (;;) {
    const r = Number(libc.sendmsg(fd, msghdr, MSG_NOSIGNAL | MSG_DONTWAIT));
    if (r >= 0) return r;
    const e = lastErrno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return WOULD_BLOCK;
    throw new SysError("sendmsg", e);
  }
}
