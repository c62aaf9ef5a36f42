/**
 * Shared helpers for tests and benchmarks that drive external processes: a
 * real Linux guest in QEMU (initramfs builder, guest runner, the end-to-end
 * scenario), qemu-storage-daemon as the reference vhost-user-blk backend, a
 * child-process wrapper for servers ({@link ServerProcess}: stderr collected,
 * stop escalating to SIGKILL), and scratch directories on a real file system.
 * Not part of the product layers.
 *
 * @module
 */

export { type CpioEntry, writeCpioNewc } from "./cpio_newc.ts";
export {
  findKernel,
  KERNEL_DIR,
  type KernelImage,
  type KernelModule,
  moduleDepends,
  REPO_ROOT,
  resolveModules,
} from "./kernel_image.ts";
export {
  buildInitramfs,
  type InitramfsFile,
  type InitramfsOptions,
  initScript,
  VIRTIO_BLK_MODULES,
} from "./initramfs.ts";
export {
  type GuestMarkers,
  type GuestOptions,
  type GuestResult,
  parseMarkers,
  qemuArgs,
  runGuest,
  type VhostUserBlkDisk,
} from "./qemu_guest.ts";
export {
  checkScenarioImage,
  type GuestScenarioOptions,
  type GuestScenarioResult,
  prepareScenarioImage,
  runGuestScenario,
  SCENARIO_CHECKS,
  SCENARIO_FILL_BYTE,
  SCENARIO_MIN_IMAGE_SIZE,
  scenarioPattern,
} from "./guest_scenario.ts";
export { QemuStorageDaemon, qsdArgs, type QsdBlockdev, type QsdOptions } from "./qsd.ts";
export { makeScratchDir } from "./scratch_dir.ts";
export { ServerProcess, type ServerProcessOptions } from "./server_process.ts";
export { type SyncEvent, type SyncKind, SyncTrace, syncTraceUnavailable } from "./sync_trace.ts";
export { CephCluster, type CephClusterOptions, cephUnavailable } from "./ceph_cluster.ts";
