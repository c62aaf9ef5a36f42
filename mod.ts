/**
 * dataplane: a userspace virtio-blk dataplane (vhost-user-blk backend) on Deno.
 * This module re-exports the public API of every layer, bottom to top.
 *
 * @example
 * ```ts
 * import { parseHostArgs, VhostUserBlkHost } from "./mod.ts";
 * const dir = Deno.makeTempDirSync();
 * const host = await VhostUserBlkHost.start(
 *   parseHostArgs(["--image", "null-co:1M", "--socket", `${dir}/s`]),
 * );
 * await host.stop();
 * Deno.removeSync(dir, { recursive: true });
 * ```
 *
 * @module
 */

export * from "./sys/mod.ts";
export * from "./aio/mod.ts";
export * from "./block/mod.ts";
export * from "./virtio/mod.ts";
export * from "./vhost_user/mod.ts";
export * from "./dataplane/mod.ts";
