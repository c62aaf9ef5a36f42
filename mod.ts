/**
 * dataplane: a userspace virtio-blk dataplane (vhost-user-blk backend) on Deno.
 * This module re-exports the public API of every layer, bottom to top.
 *
 * @module
 */

export * from "./sys/mod.ts";
