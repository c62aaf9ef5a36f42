/**
 * TCP stream sockets (AF_INET / AF_INET6): name resolution with
 * getaddrinfo, blocking and non-blocking connect, listeners, TCP_NODELAY,
 * and the socket calls a byte-stream protocol needs on its data path
 * (gathered sends from raw addresses, receives into a buffer), for both TCP
 * and Unix stream sockets: the NBD client driver and the NBD export share
 * them.
 *
 * Every socket is created close-on-exec. {@link sendIov} and {@link recvInto}
 * report "would block" as {@link WOULD_BLOCK} instead of throwing and never
 * raise SIGPIPE (MSG_NOSIGNAL); other failures throw {@link SysError}.
 *
 * @module
 */

import { libc } from "./libc.ts";
import { EAGAIN, EINPROGRESS, EINTR, EINVAL, EOPNOTSUPP } from "./errno.ts";
import { check, lastErrno, SysError } from "./sys_error.ts";
import { ADDRINFO, MSGHDR, SOCKADDR_IN, SOCKADDR_IN6 } from "./layout.ts";
import { MSG_NOSIGNAL, SOCK_CLOEXEC, SOCK_STREAM, SOL_SOCKET, WOULD_BLOCK } from "./socket.ts";

/** Address family: IPv4. */
export const AF_INET = 2;
/** Address family: IPv6. */
export const AF_INET6 = 10;
/** Address family: any (getaddrinfo hints). */
export const AF_UNSPEC = 0;
/** Protocol number of TCP. */
export const IPPROTO_TCP = 6;
/** TCP option: send small segments at once (no Nagle delay). */
export const TCP_NODELAY = 1;
/** Socket option: pending error (the outcome of a non-blocking connect). */
export const SO_ERROR = 4;
/** Socket option: allow binding a port in TIME_WAIT. */
export const SO_REUSEADDR = 2;
/** send/recv flag: this call does not block, whatever the fd's mode. */
export const MSG_DONTWAIT = 0x40;

/** One address getaddrinfo returned: its family and `struct sockaddr` bytes. */
export interface InetAddress {
  family: number;
  sockaddr: Uint8Array<ArrayBuffer>;
}

const encoder = new TextEncoder();

/**
 * Thrown when a host name does not resolve (getaddrinfo's EAI_* codes are
 * not errno values).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AddressError } from "./tcp.ts";
 * assert.equal(new AddressError("x", 1, "no").name, "AddressError");
 * ```
 */
export class AddressError extends Error {
  override name = "AddressError";
  /** The EAI_* code (negative on glibc). */
  readonly code: number;
  /** The host that failed to resolve. */
  readonly host: string;
  constructor(host: string, code: number, message: string) {
    super(`cannot resolve ${host}: ${message}`);
    this.host = host;
    this.code = code;
  }
}

/**
 * Builds a `struct sockaddr_in` / `sockaddr_in6` for a numeric address.
 * Throws SysError(EINVAL) for anything that is not a numeric IPv4 or
 * IPv6 address.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AF_INET, sockaddrInet } from "./tcp.ts";
 * const a = sockaddrInet("127.0.0.1", 10809);
 * assert.equal(a.family, AF_INET);
 * assert.deepEqual([...a.sockaddr.subarray(2, 8)], [0x2a, 0x39, 127, 0, 0, 1]);
 * ```
 */
export function sockaddrInet(host: string, port: number): InetAddress {
  if (!(Number.isInteger(port) && port >= 0 && port <= 65535)) {
    throw new SysError("sockaddr_in", EINVAL, `bad port ${port}`);
  }
  const v4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(host);
  if (v4) {
    const bytes = v4.slice(1).map(Number);
    if (bytes.some((b) => b > 255)) throw new SysError("sockaddr_in", EINVAL, host);
    const sa = new Uint8Array(SOCKADDR_IN.size);
    const dv = new DataView(sa.buffer);
    dv.setUint16(SOCKADDR_IN.sin_family, AF_INET, true);
    dv.setUint16(SOCKADDR_IN.sin_port, port);
    sa.set(bytes, SOCKADDR_IN.sin_addr);
    return { family: AF_INET, sockaddr: sa };
  }
  const h = host.startsWith("[") && host.endsWith("]") ? host.slice(1, -1) : host;
  const words = parseIpv6(h);
  if (!words) throw new SysError("sockaddr_in6", EINVAL, `not a numeric address: ${host}`);
  const sa = new Uint8Array(SOCKADDR_IN6.size);
  const dv = new DataView(sa.buffer);
  dv.setUint16(SOCKADDR_IN6.sin6_family, AF_INET6, true);
  dv.setUint16(SOCKADDR_IN6.sin6_port, port);
  for (let i = 0; i < 8; i++) dv.setUint16(SOCKADDR_IN6.sin6_addr + 2 * i, words[i]);
  return { family: AF_INET6, sockaddr: sa };
}

function parseIpv6(s: string): number[] | null {
  if (!/^[0-9a-fA-F:]+$/.test(s) || s.length < 2) return null;
  const halves = s.split("::");
  if (halves.length > 2) return null;
  const part = (x: string) => (x === "" ? [] : x.split(":"));
  const head = part(halves[0]), tail = halves.length === 2 ? part(halves[1]) : [];
  const fill = halves.length === 2 ? 8 - head.length - tail.length : 0;
  if (halves.length === 1 ? head.length !== 8 : fill < 1) return null;
  const all = [...head, ...Array(fill).fill("0"), ...tail];
  if (all.some((w) => !/^[0-9a-fA-F]{1,4}$/.test(w))) return null;
  return all.map((w) => parseInt(w, 16));
}

/**
 * getaddrinfo(host, port) for TCP: numeric addresses without a lookup,
 * names through the system resolver (blocking: /etc/hosts or DNS). Throws
 * {@link AddressError} when nothing resolves.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AF_INET, resolveTcp } from "./tcp.ts";
 * const [a] = resolveTcp("127.0.0.1", 80);
 * assert.equal(a.family, AF_INET);
 * ```
 */
export function resolveTcp(host: string, port: number): InetAddress[] {
  try {
    return [sockaddrInet(host, port)];
  } catch (e) {
    if (!(e instanceof SysError)) throw e;
  }
  const hints = new Uint8Array(ADDRINFO.size);
  const hv = new DataView(hints.buffer);
  hv.setInt32(ADDRINFO.ai_family, AF_UNSPEC, true);
  hv.setInt32(ADDRINFO.ai_socktype, SOCK_STREAM, true);
  const out = new BigUint64Array(1);
  const node = encoder.encode(host + "\0"), service = encoder.encode(`${port}\0`);
  const rc = libc.getaddrinfo(node, service, hints, new Uint8Array(out.buffer));
  if (rc !== 0) {
    const msg = libc.gai_strerror(rc);
    const text = msg ? new Deno.UnsafePointerView(msg).getCString() : `error ${rc}`;
    throw new AddressError(host, rc, text);
  }
  const list: InetAddress[] = [];
  const head = Deno.UnsafePointer.create(out[0]);
  try {
    let p = head;
    while (p) {
      const v = new Deno.UnsafePointerView(p);
      const family = v.getInt32(ADDRINFO.ai_family);
      const len = v.getUint32(ADDRINFO.ai_addrlen);
      const addr = v.getPointer(ADDRINFO.ai_addr);
      if ((family === AF_INET || family === AF_INET6) && addr && len > 0 && len <= 128) {
        const sa = new Uint8Array(len);
        new Deno.UnsafePointerView(addr).copyInto(sa);
        list.push({ family, sockaddr: sa });
      }
      p = v.getPointer(ADDRINFO.ai_next);
    }
  } finally {
    if (head) libc.freeaddrinfo(head);
  }
  if (list.length === 0) throw new AddressError(host, 0, "no IPv4 or IPv6 address");
  return list;
}

/**
 * socket(family, SOCK_STREAM | SOCK_CLOEXEC | flags, 0): a TCP socket for
 * AF_INET / AF_INET6 (or a Unix one for AF_UNIX).
 *
 * @example
 * ```ts
 * import { AF_INET, socketStream } from "./tcp.ts";
 * import { close } from "./fd.ts";
 * close(socketStream(AF_INET));
 * ```
 */
export function socketStream(family: number, flags = 0): number {
  return check("socket", libc.socket(family, SOCK_STREAM | SOCK_CLOEXEC | flags, 0));
}

/**
 * connect(2) to a `struct sockaddr`. On a blocking socket returns true once
 * connected; on a non-blocking one returns false while the connection is
 * in progress (EINPROGRESS: wait until writable, then {@link socketError}).
 * Throws SysError (ECONNREFUSED, ENOENT for a Unix path, ...).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AF_INET, connectSockaddr, sockaddrInet, socketStream } from "./tcp.ts";
 * import { close } from "./fd.ts";
 * const fd = socketStream(AF_INET);
 * // Port 1 on loopback: nobody listens there.
 * assert.throws(() => connectSockaddr(fd, sockaddrInet("127.0.0.1", 1).sockaddr), /ECONNREFUSED/);
 * close(fd);
 * ```
 */
export function connectSockaddr(fd: number, sockaddr: Uint8Array<ArrayBuffer>, what = ""): boolean {
  for (;;) {
    const r = libc.connect(fd, sockaddr, sockaddr.byteLength);
    if (r >= 0) return true;
    const e = lastErrno();
    if (e === EINTR) continue;
    if (e === EINPROGRESS) return false;
    throw new SysError("connect", e, what);
  }
}

/**
 * getsockopt(SO_ERROR): 0, or the errno a non-blocking connect ended with.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { socketError } from "./tcp.ts";
 * import { socketpair, close } from "./mod.ts";
 * const [a, b] = socketpair();
 * assert.equal(socketError(a), 0);
 * close(a); close(b);
 * ```
 */
export function socketError(fd: number): number {
  const v = new Int32Array(1), len = new Uint32Array([4]);
  check(
    "getsockopt",
    libc.getsockopt(fd, SOL_SOCKET, SO_ERROR, new Uint8Array(v.buffer), new Uint8Array(len.buffer)),
  );
  return v[0];
}

/**
 * setsockopt(IPPROTO_TCP, TCP_NODELAY): requests leave at once (no Nagle).
 * On a Unix socket it does nothing (EOPNOTSUPP is ignored, so callers need
 * not know the family); other failures throw SysError.
 *
 * @example
 * ```ts
 * import { AF_INET, setTcpNoDelay, socketStream } from "./tcp.ts";
 * import { close, socketpair } from "./mod.ts";
 * const fd = socketStream(AF_INET);
 * setTcpNoDelay(fd);
 * close(fd);
 * const [a, b] = socketpair();
 * setTcpNoDelay(a); // a Unix socket: ignored
 * close(a); close(b);
 * ```
 */
export function setTcpNoDelay(fd: number, on = true): void {
  const v = new Int32Array([on ? 1 : 0]);
  const r = libc.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, new Uint8Array(v.buffer), 4);
  if (r < 0) {
    const e = lastErrno();
    if (e !== EOPNOTSUPP) throw new SysError("setsockopt", e, "TCP_NODELAY");
  }
}

/**
 * A listening TCP socket on `host:port` (a numeric address or a name that
 * resolves; port 0 picks a free one, see {@link socketPort}), SO_REUSEADDR,
 * close-on-exec, plus `flags` (e.g. SOCK_NONBLOCK).
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
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new SysError("bind", EINVAL, `bad port ${port}`);
  }
  const [addr] = resolveTcp(host, port);
  const fd = socketStream(addr.family, flags);
  try {
    const one = new Int32Array([1]);
    check(
      "setsockopt",
      libc.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, new Uint8Array(one.buffer), 4),
    );
    check("bind", libc.bind(fd, addr.sockaddr, addr.sockaddr.byteLength), `${host}:${port}`);
    check("listen", libc.listen(fd, backlog));
  } catch (e) {
    libc.close(fd);
    throw e;
  }
  return fd;
}

/**
 * The local port of a TCP socket, IPv4 or IPv6 (getsockname).
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

/** A msghdr per thread (module instance) for {@link sendIov}: no allocation per call. */
const sendHdr = new BigUint64Array(MSGHDR.size / 8);
const sendHdrPtr = Deno.UnsafePointer.of(sendHdr);

/**
 * sendmsg(2) of `niov` `struct iovec` entries at host address `iovAddr`
 * (MSG_NOSIGNAL), never blocking (MSG_DONTWAIT). Returns the bytes sent (possibly fewer than asked) or
 * {@link WOULD_BLOCK}. Hot path: no allocation.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { recvInto, sendIov } from "./tcp.ts";
 * import { addressOf, socketpair, close } from "./mod.ts";
 * const [a, b] = socketpair();
 * const data = new Uint8Array([1, 2, 3]);
 * const iov = new BigUint64Array([BigInt(addressOf(data)), 3n]);
 * assert.equal(sendIov(a, addressOf(iov), 1), 3);
 * const got = new Uint8Array(8);
 * assert.equal(recvInto(b, got, 0, 8), 3);
 * close(a); close(b);
 * ```
 */
export function sendIov(fd: number, iovAddr: number, niov: number): number {
  sendHdr[MSGHDR.msg_iov / 8] = BigInt(iovAddr);
  sendHdr[MSGHDR.msg_iovlen / 8] = BigInt(niov);
  for (;;) {
    const r = libc.sendmsg_p(fd, sendHdrPtr, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r >= 0) return Number(r);
    const e = lastErrno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return WOULD_BLOCK;
    throw new SysError("sendmsg", e);
  }
}

/**
 * recv(2) of up to `length` bytes into `buf` at `at`, never blocking
 * (MSG_DONTWAIT): the count, 0 at end of stream, or {@link WOULD_BLOCK}.
 * Hot path: allocates nothing but a subarray view.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { recvInto } from "./tcp.ts";
 * import { socketpair, SOCK_NONBLOCK, WOULD_BLOCK, close } from "./mod.ts";
 * const [a, b] = socketpair(SOCK_NONBLOCK);
 * assert.equal(recvInto(b, new Uint8Array(4), 0, 4), WOULD_BLOCK);
 * close(a);
 * assert.equal(recvInto(b, new Uint8Array(4), 0, 4), 0);
 * close(b);
 * ```
 */
export function recvInto(fd: number, buf: Uint8Array, at: number, length: number): number {
  if (at < 0 || length < 0 || at + length > buf.byteLength) {
    throw new RangeError("recvInto: range outside the buffer");
  }
  const view = at === 0 ? buf : buf.subarray(at);
  for (;;) {
    const r = libc.recv(fd, view, BigInt(length), MSG_DONTWAIT);
    if (r >= 0) return Number(r);
    const e = lastErrno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return WOULD_BLOCK;
    throw new SysError("recv", e);
  }
}
