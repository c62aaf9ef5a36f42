/**
 * block/throttle/: the throttle filter driver (QEMU block/throttle.c), for
 * tests and benchmarks that stack it by hand. block/mod.ts does not load
 * it: BlockBackend.open imports it when a graph first needs a throttle node
 * (see block/mod.ts); throttle groups and their configuration are in
 * block/mod.ts.
 *
 * @module
 */

export { ThrottleDriver } from "./throttle_driver.ts";
export { THROTTLE_GROUP_BYTES, ThrottleGroup, ThrottleGroupError } from "./throttle_group.ts";
export { throttleConfigInit } from "./throttle_config.ts";
