/**
 * block/qcow2/: the qcow2 format driver's own classes (QEMU block/qcow2*.c),
 * for tests and benchmarks that drive it directly. block/mod.ts does not
 * load them: BlockBackend.open imports the driver when it first opens a
 * qcow2 node (see block/mod.ts).
 *
 * @module
 */

export {
  QCOW2_DEFAULT_L2_CACHE_MAX,
  Qcow2Driver,
  type Qcow2DriverOptions,
} from "./qcow2_driver.ts";
export { openQcow2Image, type Qcow2ImageOptions } from "./image_chain.ts";
export { parseQcow2Header, QCOW2_HEADER_PROBE_BYTES, type Qcow2Header } from "./header.ts";
export { Qcow2Error, type Qcow2ErrorKind } from "./qcow2_error.ts";
export { Qcow2SharedState } from "./shared_state.ts";
