/**
 * Linux errno values (x86_64, asm-generic/errno-base.h and errno.h) and their
 * names, as used in {@link SysError} and in the `-errno` completion codes of the
 * block layer.
 *
 * @module
 */

/** Operation not permitted. */
export const EPERM = 1;
/** No such file or directory. */
export const ENOENT = 2;
/** Interrupted system call. */
export const EINTR = 4;
/** I/O error. */
export const EIO = 5;
/** Bad file descriptor. */
export const EBADF = 9;
/** Try again (would block, or Linux AIO queue full). */
export const EAGAIN = 11;
/** Out of memory. */
export const ENOMEM = 12;
/** Permission denied. */
export const EACCES = 13;
/** Bad address. */
export const EFAULT = 14;
/** Device or resource busy. */
export const EBUSY = 16;
/** File exists. */
export const EEXIST = 17;
/** No such device. */
export const ENODEV = 19;
/** Not a directory. */
export const ENOTDIR = 20;
/** Is a directory. */
export const EISDIR = 21;
/** Invalid argument. */
export const EINVAL = 22;
/** Too many open files. */
export const EMFILE = 24;
/** Inappropriate ioctl for device. */
export const ENOTTY = 25;
/** File too large. */
export const EFBIG = 27;
/** No space left on device. */
export const ENOSPC = 28;
/** Illegal seek. */
export const ESPIPE = 29;
/** Read-only file system. */
export const EROFS = 30;
/** Broken pipe. */
export const EPIPE = 32;
/** Math result not representable (also: range errors). */
export const ERANGE = 34;
/** File name too long (also: a Unix socket path over 107 bytes). */
export const ENAMETOOLONG = 36;
/** Function not implemented. */
export const ENOSYS = 38;
/** Message too long. */
export const EMSGSIZE = 90;
/** Protocol error. */
export const EPROTO = 71;
/** Value too large for defined data type. */
export const EOVERFLOW = 75;
/** Operation not supported. */
export const EOPNOTSUPP = 95;
/** Address already in use. */
export const EADDRINUSE = 98;
/** Connection reset by peer. */
export const ECONNRESET = 104;
/** Transport endpoint is not connected. */
export const ENOTCONN = 107;
/** Cannot send after transport endpoint shutdown. */
export const ESHUTDOWN = 108;
/** Connection timed out. */
export const ETIMEDOUT = 110;
/** Connection refused. */
export const ECONNREFUSED = 111;
/** Operation now in progress (non-blocking connect). */
export const EINPROGRESS = 115;
/** Operation canceled. */
export const ECANCELED = 125;

const NAMES: Record<number, string> = {
  [EPERM]: "EPERM",
  [ENOENT]: "ENOENT",
  [EINTR]: "EINTR",
  [EIO]: "EIO",
  [EBADF]: "EBADF",
  [EAGAIN]: "EAGAIN",
  [ENOMEM]: "ENOMEM",
  [EACCES]: "EACCES",
  [EFAULT]: "EFAULT",
  [EBUSY]: "EBUSY",
  [EEXIST]: "EEXIST",
  [ENODEV]: "ENODEV",
  [ENOTDIR]: "ENOTDIR",
  [EISDIR]: "EISDIR",
  [EINVAL]: "EINVAL",
  [EMFILE]: "EMFILE",
  [ENOTTY]: "ENOTTY",
  [EFBIG]: "EFBIG",
  [ENOSPC]: "ENOSPC",
  [ESPIPE]: "ESPIPE",
  [EROFS]: "EROFS",
  [EPIPE]: "EPIPE",
  [ERANGE]: "ERANGE",
  [ENAMETOOLONG]: "ENAMETOOLONG",
  [ENOSYS]: "ENOSYS",
  [EMSGSIZE]: "EMSGSIZE",
  [EPROTO]: "EPROTO",
  [EOVERFLOW]: "EOVERFLOW",
  [EOPNOTSUPP]: "EOPNOTSUPP",
  [EADDRINUSE]: "EADDRINUSE",
  [ECONNRESET]: "ECONNRESET",
  [ENOTCONN]: "ENOTCONN",
  [ESHUTDOWN]: "ESHUTDOWN",
  [ETIMEDOUT]: "ETIMEDOUT",
  [ECONNREFUSED]: "ECONNREFUSED",
  [EINPROGRESS]: "EINPROGRESS",
  [ECANCELED]: "ECANCELED",
};

/**
 * The symbolic name of an errno value, or `E<number>` for one not listed.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { errnoName, EAGAIN } from "./errno.ts";
 * assert.equal(errnoName(EAGAIN), "EAGAIN");
 * ```
 */
export function errnoName(errno: number): string {
  return NAMES[errno] ?? `E${errno}`;
}
