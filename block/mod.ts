/**
 * block/: QEMU's block layer reduced to what a virtio-blk dataplane needs:
 * BlockBackend, format (raw) over protocol drivers (file, null), and the I/O
 * engines for `file` (threads, Linux AIO, io_uring).
 *
 * Not for: guest memory or virtqueues (virtio/), threads and sockets
 * (dataplane/).
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
export { LinuxAioEngine, type LinuxAioOptions } from "./linux_aio_engine.ts";
export { IoUringEngine, type IoUringOptions, type IoUringTaskrun } from "./io_uring_engine.ts";
export { ThreadPoolEngine } from "./thread_pool_engine.ts";
