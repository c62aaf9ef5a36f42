/**
 * AF_UNIX stream sockets with file-descriptor passing (SCM_RIGHTS): the
 * transport of vhost-user and of the monitor socket.
 *
 * Every socket is created close-on-exec; received descriptors are too
 * (MSG_CMSG_CLOEXEC). Calls retry on EINTR. On a non-blocking socket,
 * {@link accept4}, {@link sendMsg} and {@link recvMsg} report "would block"
 * as {@link WOULD_BLOCK} (-1) instead of throwing; every other failure throws
 * {@link SysError}.
 *
 * Control plane only: these calls allocate (msghdr, iovec and control buffers
 * are small per-call typed arrays).
 *
 * @module
 */

import { libc } from "./libc.ts";
import { EAGAIN, EINTR, ENAMETOOLONG } from "./errno.ts";
import { check, lastErrno, SysError } from "./sys_error.ts";
import { addressOf } from "./pointer.ts";
import { CMSGHDR, IOVEC, MSGHDR, SOCKADDR_UN } from "./layout.ts";

/** Address family: local (Unix domain) sockets. */
export const AF_UNIX = 1;
/** Socket type: reliable byte stream. */
export const SOCK_STREAM = 1;
/** socket/accept4 flag: non-blocking. */
export const SOCK_NONBLOCK = 0o4000;
/** socket/accept4 flag: close on exec. */
export const SOCK_CLOEXEC = 0o2000000;
/** Socket-level option/control-message level. */
export const SOL_SOCKET = 1;
/** Control message type: an array of file descriptors. */
export const SCM_RIGHTS = 1;
/** recvmsg flag: received descriptors are close-on-exec. */
export const MSG_CMSG_CLOEXEC = 0x40000000;
/** send flag: no SIGPIPE when the peer has gone (EPIPE instead). */
export const MSG_NOSIGNAL = 0x4000;
/** recvmsg result flag: control data was truncated (descriptors dropped). */
export const MSG_CTRUNC = 0x8;
/** recvmsg result flag: data was truncated (datagram sockets). */
export const MSG_TRUNC = 0x20;
/** shutdown: no more receptions. */
export const SHUT_RD = 0;
/** shutdown: no more transmissions. */
export const SHUT_WR = 1;
/** shutdown: neither. */
export const SHUT_RDWR = 2;
/** Returned by {@link accept4}, {@link sendMsg}, {@link recvMsg} on EAGAIN. */
export const WOULD_BLOCK = -1;
/** The longest socket path: sun_path is 108 bytes including the NUL. */
export const UNIX_PATH_MAX = SOCKADDR_UN.pathMax - 1;

const encoder = new TextEncoder();

/**
 * Builds a `struct sockaddr_un` for `path`. Throws SysError(ENAMETOOLONG)
 * when the UTF-8 path is longer than {@link UNIX_PATH_MAX} (107) bytes, the
 * kernel limit that would otherwise silently truncate it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { sockaddrUn } from "./socket.ts";
 * const sa = sockaddrUn("/tmp/x.sock");
 * assert.equal(sa[0], 1);
 * assert.equal(sa[2], "/".charCodeAt(0));
 * ```
 */
export function sockaddrUn(path: string, call = "sockaddr_un"): Uint8Array<ArrayBuffer> {
  const bytes = encoder.encode(path);
  if (bytes.length === 0 || bytes.length > UNIX_PATH_MAX) {
    throw new SysError(
      call,
      ENAMETOOLONG,
      `socket path is ${bytes.length} bytes; a Unix socket path must be 1..${UNIX_PATH_MAX}: ${path}`,
    );
  }
  const sa = new Uint8Array(SOCKADDR_UN.size);
  new DataView(sa.buffer).setUint16(SOCKADDR_UN.sun_family, AF_UNIX, true);
  sa.set(bytes, SOCKADDR_UN.sun_path);
  return sa;
}

/**
 * socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | flags, 0).
 *
 * @example
 * ```ts
 * import { socketUnix, SOCK_NONBLOCK, close } from "./mod.ts";
 * close(socketUnix(SOCK_NONBLOCK));
 * ```
 */
export function socketUnix(flags = 0): number {
  return check("socket", libc.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | flags, 0));
}

/**
 * bind(2) a Unix socket to `path` (which must not exist).
 *
 * @example
 * ```ts
 * import { bindUnix, socketUnix, close } from "./mod.ts";
 * const dir = Deno.makeTempDirSync();
 * const fd = socketUnix();
 * bindUnix(fd, `${dir}/s`);
 * close(fd);
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export function bindUnix(fd: number, path: string): void {
  const sa = sockaddrUn(path, "bind");
  check("bind", libc.bind(fd, sa, SOCKADDR_UN.size), path);
}

/**
 * listen(2).
 *
 * @example
 * ```ts
 * import { bindUnix, listen, socketUnix, close } from "./mod.ts";
 * const dir = Deno.makeTempDirSync();
 * const fd = socketUnix();
 * bindUnix(fd, `${dir}/s`);
 * listen(fd, 4);
 * close(fd);
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export function listen(fd: number, backlog = 16): void {
  check("listen", libc.listen(fd, backlog));
}

/**
 * accept4(2) with SOCK_CLOEXEC (plus `flags`, e.g. SOCK_NONBLOCK). Returns
 * the connected fd, or {@link WOULD_BLOCK} when a non-blocking listener has
 * no pending connection.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { accept4, bindUnix, listen, socketUnix, close, SOCK_NONBLOCK, WOULD_BLOCK } from "./mod.ts";
 * const dir = Deno.makeTempDirSync();
 * const fd = socketUnix(SOCK_NONBLOCK);
 * bindUnix(fd, `${dir}/s`);
 * listen(fd);
 * assert.equal(accept4(fd), WOULD_BLOCK);
 * close(fd);
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export function accept4(fd: number, flags = 0): number {
  for (;;) {
    const r = libc.accept4(fd, null, null, SOCK_CLOEXEC | flags);
    if (r >= 0) return r;
    const e = lastErrno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return WOULD_BLOCK;
    throw new SysError("accept4", e);
  }
}

/**
 * connect(2) a Unix socket to `path`. Throws SysError: ENOENT (no socket),
 * ECONNREFUSED (nobody listening), ENAMETOOLONG (path too long).
 *
 * @example
 * ```ts
 * import { bindUnix, connectUnix, listen, socketUnix, close } from "./mod.ts";
 * const dir = Deno.makeTempDirSync();
 * const l = socketUnix();
 * bindUnix(l, `${dir}/s`);
 * listen(l);
 * const c = socketUnix();
 * connectUnix(c, `${dir}/s`);
 * close(c); close(l);
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export function connectUnix(fd: number, path: string): void {
  const sa = sockaddrUn(path, "connect");
  for (;;) {
    const r = libc.connect(fd, sa, SOCKADDR_UN.size);
    if (r >= 0) return;
    const e = lastErrno();
    if (e === EINTR) continue;
    throw new SysError("connect", e, path);
  }
}

/**
 * socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | flags): two connected
 * sockets (tests, in-process transports).
 *
 * @example
 * ```ts
 * import { socketpair, close } from "./mod.ts";
 * const [a, b] = socketpair();
 * close(a); close(b);
 * ```
 */
export function socketpair(flags = 0): [number, number] {
  const fds = new Int32Array(2);
  check(
    "socketpair",
    libc.socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | flags, 0, new Uint8Array(fds.buffer)),
  );
  return [fds[0], fds[1]];
}

/**
 * shutdown(2): `how` is SHUT_RD, SHUT_WR or SHUT_RDWR.
 *
 * @example
 * ```ts
 * import { socketpair, shutdown, SHUT_WR, close } from "./mod.ts";
 * const [a, b] = socketpair();
 * shutdown(a, SHUT_WR);
 * close(a); close(b);
 * ```
 */
export function shutdown(fd: number, how = SHUT_RDWR): void {
  check("shutdown", libc.shutdown(fd, how));
}

function cmsgAlign(n: number): number {
  return (n + 7) & ~7;
}

/** CMSG_SPACE(nfds * 4): control buffer bytes for `nfds` descriptors. */
function cmsgSpace(nfds: number): number {
  return CMSGHDR.data + cmsgAlign(nfds * 4);
}

/**
 * sendmsg(2) of `bytes` with `fds` attached as one SCM_RIGHTS control
 * message (MSG_NOSIGNAL: a vanished peer gives EPIPE, not SIGPIPE). Returns
 * the number of bytes sent, which may be fewer than `bytes.length` (the fds
 * went with the first byte), or {@link WOULD_BLOCK}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { recvMsg, sendMsg, socketpair, close } from "./mod.ts";
 * const [a, b] = socketpair();
 * assert.equal(sendMsg(a, new Uint8Array([1, 2]), [a]), 2);
 * const r = recvMsg(b, new Uint8Array(8), 4);
 * assert.equal(r.n, 2);
 * assert.equal(r.fds.length, 1);
 * close(r.fds[0]); close(a); close(b);
 * ```
 */
export function sendMsg(fd: number, bytes: Uint8Array, fds: readonly number[] = []): number {
  const iov = new BigUint64Array(IOVEC.size / 8);
  iov[0] = BigInt(addressOf(bytes));
  iov[1] = BigInt(bytes.byteLength);
  const hdr = new BigUint64Array(MSGHDR.size / 8);
  hdr[MSGHDR.msg_iov / 8] = BigInt(addressOf(iov));
  hdr[MSGHDR.msg_iovlen / 8] = 1n;
  let control: Uint8Array | undefined;
  if (fds.length > 0) {
    control = new Uint8Array(cmsgSpace(fds.length));
    const dv = new DataView(control.buffer);
    dv.setBigUint64(CMSGHDR.cmsg_len, BigInt(CMSGHDR.data + fds.length * 4), true);
    dv.setInt32(CMSGHDR.cmsg_level, SOL_SOCKET, true);
    dv.setInt32(CMSGHDR.cmsg_type, SCM_RIGHTS, true);
    for (let i = 0; i < fds.length; i++) dv.setInt32(CMSGHDR.data + 4 * i, fds[i], true);
    hdr[MSGHDR.msg_control / 8] = BigInt(addressOf(control));
    hdr[MSGHDR.msg_controllen / 8] = BigInt(control.byteLength);
  }
  const hdrBytes = new Uint8Array(hdr.buffer);
  for (;;) {
    const r = libc.sendmsg(fd, hdrBytes, MSG_NOSIGNAL);
    if (r >= 0) {
      // Keep the buffers the kernel read from alive until here.
      void bytes, iov, control;
      return Number(r);
    }
    const e = lastErrno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return WOULD_BLOCK;
    throw new SysError("sendmsg", e);
  }
}

/** What one {@link recvMsg} call received. */
export interface RecvResult {
  /** Bytes received; 0 at end of stream; {@link WOULD_BLOCK} when nothing was pending. */
  n: number;
  /** Descriptors received (close-on-exec); the caller owns and must close them. */
  fds: number[];
  /** The kernel dropped descriptors that did not fit in `maxFds` (MSG_CTRUNC). */
  ctrunc: boolean;
  /** MSG_TRUNC was reported (never for stream sockets). */
  msgTrunc: boolean;
}

/**
 * recvmsg(2) into `buf` (at most `length` bytes), accepting up to `maxFds`
 * descriptors (MSG_CMSG_CLOEXEC; the control buffer is rounded up to 8 bytes,
 * so an odd `maxFds` admits one more). On a non-blocking socket with nothing
 * pending returns `n` = {@link WOULD_BLOCK}. When more descriptors arrived
 * than fit, the kernel closes the excess and `ctrunc` is set; the ones that
 * fit are still returned.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { recvMsg, sendMsg, socketpair, close, SOCK_NONBLOCK, WOULD_BLOCK } from "./mod.ts";
 * const [a, b] = socketpair(SOCK_NONBLOCK);
 * assert.equal(recvMsg(b, new Uint8Array(4), 0).n, WOULD_BLOCK);
 * sendMsg(a, new Uint8Array([9]));
 * assert.equal(recvMsg(b, new Uint8Array(4), 0).n, 1);
 * close(a); close(b);
 * ```
 */
export function recvMsg(
  fd: number,
  buf: Uint8Array,
  maxFds: number,
  length = buf.byteLength,
): RecvResult {
  if (length > buf.byteLength) throw new RangeError("recvMsg: length exceeds the buffer");
  const iov = new BigUint64Array(IOVEC.size / 8);
  iov[0] = BigInt(addressOf(buf));
  iov[1] = BigInt(length);
  const hdr = new BigUint64Array(MSGHDR.size / 8);
  hdr[MSGHDR.msg_iov / 8] = BigInt(addressOf(iov));
  hdr[MSGHDR.msg_iovlen / 8] = 1n;
  const control = maxFds > 0 ? new Uint8Array(cmsgSpace(maxFds)) : undefined;
  if (control) {
    hdr[MSGHDR.msg_control / 8] = BigInt(addressOf(control));
    hdr[MSGHDR.msg_controllen / 8] = BigInt(control.byteLength);
  }
  const hdrBytes = new Uint8Array(hdr.buffer);
  let r: number | bigint;
  for (;;) {
    r = libc.recvmsg(fd, hdrBytes, MSG_CMSG_CLOEXEC);
    if (r >= 0) break;
    const e = lastErrno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return { n: WOULD_BLOCK, fds: [], ctrunc: false, msgTrunc: false };
    throw new SysError("recvmsg", e);
  }
  void buf, iov;
  const hv = new DataView(hdrBytes.buffer);
  const flags = hv.getInt32(MSGHDR.msg_flags, true);
  const fds: number[] = [];
  if (control) {
    const controllen = Number(hv.getBigUint64(MSGHDR.msg_controllen, true));
    const cv = new DataView(control.buffer);
    let off = 0;
    while (off + CMSGHDR.data <= controllen) {
      const len = Number(cv.getBigUint64(off + CMSGHDR.cmsg_len, true));
      if (len < CMSGHDR.data || off + len > controllen) break;
      const level = cv.getInt32(off + CMSGHDR.cmsg_level, true);
      const type = cv.getInt32(off + CMSGHDR.cmsg_type, true);
      if (level === SOL_SOCKET && type === SCM_RIGHTS) {
        const n = Math.floor((len - CMSGHDR.data) / 4);
        for (let i = 0; i < n; i++) fds.push(cv.getInt32(off + CMSGHDR.data + 4 * i, true));
      }
      off += cmsgAlign(len);
    }
  }
  return {
    n: Number(r),
    fds,
    ctrunc: (flags & MSG_CTRUNC) !== 0,
    msgTrunc: (flags & MSG_TRUNC) !== 0,
  };
}
