/**
 * NBD error values on the wire and host errno values, both ways (QEMU's
 * nbd_errno_to_system_errno and system_errno_to_nbd_errno): the client
 * driver maps what a server says, the export what the block layer says.
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
} from "./nbd_protocol.ts";
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
  ESHUTDOWN,
} from "../../sys/mod.ts";

/** Disk quota exceeded (not in sys/errno.ts's list): reported as NBD_ENOSPC. */
const EDQUOT = 122;

/**
 * Maps an error on the wire to a host errno (QEMU's nbd_errno_to_system_errno):
 * unknown values become EINVAL.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { nbdErrnoToSystemErrno } from "./nbd_errno.ts";
 * assert.equal(nbdErrnoToSystemErrno(5), 5);
 * assert.equal(nbdErrnoToSystemErrno(12345), 22);
 * ```
 */
export function nbdErrnoToSystemErrno(err: number): number {
  switch (err) {
    case NBD_EPERM:
      return EPERM;
    case NBD_EIO:
      return EIO;
    case NBD_ENOMEM:
      return ENOMEM;
    case NBD_ENOSPC:
      return ENOSPC;
    case NBD_EOVERFLOW:
      return EOVERFLOW;
    case NBD_ENOTSUP:
      return EOPNOTSUPP;
    case NBD_ESHUTDOWN:
      return ESHUTDOWN;
    default:
      return EINVAL;
  }
}

/**
 * Maps a positive host errno to its NBD error value (QEMU's
 * system_errno_to_nbd_errno): the wire has its own short list; anything
 * else is EINVAL.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { systemErrnoToNbdErrno } from "./nbd_errno.ts";
 * assert.equal(systemErrnoToNbdErrno(30), 1); // EROFS -> NBD_EPERM
 * assert.equal(systemErrnoToNbdErrno(2), 22); // ENOENT -> NBD_EINVAL
 * ```
 */
export function systemErrnoToNbdErrno(errno: number): number {
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
