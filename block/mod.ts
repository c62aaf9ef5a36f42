/**
 * block/: QEMU's block layer reduced to what a virtio-blk dataplane needs:
 * BlockBackend, formats (raw, qcow2) over protocol drivers (file, null, nbd, rbd), the
 * throttle filter and its groups, the I/O engines for `file` (threads, Linux AIO, io_uring),
 * and the NBD wire protocol shared with the NBD export.
 *
 * Not for: guest memory or virtqueues (virtio/), IOThreads, exports and servers
 * (dataplane/).
 *
 * The qcow2, NBD client and throttle drivers are not loaded by this module:
 * {@link BlockBackend.open} imports them when it first opens a node of theirs,
 * so an isolate (the main thread, each IOThread) serving raw files never
 * compiles them. Their own classes are in block/qcow2/mod.ts,
 * block/nbd/mod.ts and block/throttle/mod.ts (tests, benchmarks); what other
 * layers need of them at start-up (options, errors, the qcow2 shared state,
 * throttle groups, the NBD wire protocol) stays here.
 *
 * @module
 */

export { IOV_MAX, IoVector } from "./io_vector.ts";
export { BlockBackend, type BlockBackendExtras, type BlockDevOps } from "./block_backend.ts";
export type { BlockCompletion, BlockDriver } from "./block_driver.ts";
export { type BlockOptions, parseBlockOptions, validateBlockOptions } from "./block_options.ts";
export type { IoEngine, IoEngineKind, IoEngineStats } from "./io_engine.ts";
export { createIoEngine } from "./io_engine_registry.ts";
export { FileDriver, type FileDriverOptions } from "./file_driver.ts";
export { RangeLockTable, type RangeLockTableOptions } from "./range_lock_table.ts";
export { NullAioDriver, NullCoDriver, type NullDriverOptions } from "./null_driver.ts";
export { RawDriver, type RawDriverOptions } from "./raw_driver.ts";
export { RbdDriver, type RbdDriverOptions, resizeRbdImage } from "./rbd_driver.ts";
export { parseRbdFilename } from "./rbd_filename.ts";
export type { Qcow2DriverOptions } from "./qcow2/qcow2_driver.ts";
export { Qcow2Error, type Qcow2ErrorKind } from "./qcow2/qcow2_error.ts";
export type { Qcow2Header } from "./qcow2/header.ts";
export type { Qcow2ImageOptions } from "./qcow2/image_chain.ts";
export { Qcow2SharedState } from "./qcow2/shared_state.ts";
export { LinuxAioEngine, type LinuxAioOptions } from "./linux_aio_engine.ts";
export { IoUringEngine, type IoUringOptions, type IoUringTaskrun } from "./io_uring_engine.ts";
export { ThreadPoolEngine } from "./thread_pool_engine.ts";

// Errors thrown in an IOThread arrive on the main thread as these classes.
import { registerErrorClass } from "../aio/mod.ts";
import { Qcow2Error } from "./qcow2/qcow2_error.ts";
registerErrorClass("Qcow2Error", Qcow2Error);
export * from "./nbd/nbd_protocol.ts";
export {
  cloneThrottleConfig,
  THROTTLE_BUCKETS,
  THROTTLE_VALUE_MAX,
  type ThrottleBucketConfig,
  type ThrottleBucketName,
  type ThrottleConfig,
  throttleConfigInit,
  throttleIsValid,
} from "./throttle/throttle_config.ts";
export {
  THROTTLE_GROUP_BYTES,
  ThrottleGroup,
  ThrottleGroupError,
} from "./throttle/throttle_group.ts";
import { ThrottleGroupError } from "./throttle/throttle_group.ts";
registerErrorClass("ThrottleGroupError", ThrottleGroupError);
export type { NbdClientOptions, NbdClientState } from "./nbd/nbd_client.ts";
export { nbdErrnoToSystemErrno, systemErrnoToNbdErrno } from "./nbd/nbd_errno.ts";
export type { NbdExportInfo } from "./nbd/nbd_handshake.ts";
export { NbdError, type NbdErrorKind } from "./nbd/nbd_error.ts";
export {
  describeNbdServer,
  NBD_DEFAULT_PORT,
  type NbdServerAddress,
  type NbdUri,
  parseNbdUri,
} from "./nbd/nbd_address.ts";
