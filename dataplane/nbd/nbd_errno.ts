/**
 * The block layer's `-errno` results as NBD error values (QEMU's
 * system_errno_to_nbd_errno): the wire has its own short list; anything
 * else is EINVAL.
 *
 * @module
 */

import {
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from "../../block/mod.ts";
import {
  EFBIG,
  EINVAL,
  EIO,
  ENOMEM,
  ENOSPC,
  EOPNOTSUPP,
  EOVERFLOW,
  EPERM,
  EROFS,
} from "../../sys/mod.ts";

const ESHUTDOWN = 108;
const EDQUOT = 122;

/**
 * Maps a positive host errno to its NBD error value.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { nbdErrnoOf } from "./nbd_errno.ts";
 * assert.equal(nbdErrnoOf(30), 1); // EROFS -> NBD_EPERM
 * assert.equal(nbdErrnoOf(2), 22); // ENOENT -> NBD_EINVAL
 * ```
 */
export function nbdErrnoOf(errno: number): number {
  switch (errno) {
    case 0:
      return 0;
    case EPERM:
    case EROFS:
      return NBD_EPERM;
    case EIO:
      return NBD_EIO;
    case ENOMEM:
      return NBD_ENOMEM;
    case ENOSPC:
    case EFBIG:
    case EDQUOT:
      return NBD_ENOSPC;
    case EOVERFLOW:
      return NBD_EOVERFLOW;
    case EOPNOTSUPP:
      return NBD_ENOTSUP;
    case ESHUTDOWN:
      return NBD_ESHUTDOWN;
    case EINVAL:
    default:
      return NBD_EINVAL;
  }
}
