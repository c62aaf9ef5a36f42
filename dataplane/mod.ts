/**
 * dataplane/: IOThreads running a virtio-blk dataplane each
 * (`VirtioBlkDataPlane`, QEMU's hw/block/dataplane), started by
 * `startBlkIOThreads`; the main-thread vhost-user-blk device that ties them
 * to a vhost-user connection, and the host (`VhostUserBlkHost`, CLI in
 * main.ts: the short options run as one daemon export, host_export.ts).
 * vm/ (the KVM host) sits above and drives the same IOThreads
 * from its virtio-mmio transport.
 * Not for: the vhost-user protocol (vhost_user/), ring parsing (virtio/),
 * I/O submission (block/), event loops (aio/).
 *
 * @module
 */

export {
  type DataPlaneOptions,
  type DataPlaneQueueSetup,
  type DataPlaneQueueStats,
  VirtioBlkDataPlane,
} from "./virtio_blk_dataplane.ts";
export { VhostUserBlkDevice, type VhostUserBlkDeviceOptions } from "./vhost_user_blk_device.ts";
export type { BlkImageInfo, BlkThreadData, BlkThreadStats } from "./blk_iothread.ts";
export {
  type BlkIOThreads,
  deviceModel,
  formatStats,
  type HostStats,
  startBlkIOThreads,
  VhostUserBlkHost,
} from "./host.ts";
export {
  HOST_USAGE,
  type HostBlockOptions,
  type HostOptions,
  parseHostArgs,
  parseSize,
  UsageError,
} from "./host_options.ts";
export { taskArgs } from "./task_args.ts";
export { HOST_V8_FLAGS, HOST_V8_FLAGS_ARG } from "./v8_flags.ts";
