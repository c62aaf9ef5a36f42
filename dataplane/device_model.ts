/**
 * The virtio-blk device model a host or an export serves, derived from its
 * options and the image (as QEMU's vhost-user-blk export fills struct
 * virtio_blk_config).
 *
 * @module
 */

import { segMaxForQueueSize, type VirtioBlkOptions } from "../virtio/mod.ts";
import type { BlkImageInfo } from "./blk_iothread.ts";
import type { HostOptions } from "./host_options.ts";

/**
 * Derives the virtio-blk device model from the host options and the image
 * (as QEMU's vhost-user-blk export fills struct virtio_blk_config).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { deviceModel } from "./device_model.ts";
 * import { parseHostArgs } from "./host_options.ts";
 * const o = parseHostArgs(["--image", "null-co:1M", "--socket", "/tmp/s"]);
 * const d = deviceModel(o, { length: 1 << 20, requestAlignment: 1, memAlignment: 1, readOnly: false });
 * assert.equal(d.capacity, 2048);
 * assert.equal(d.numQueues, 1);
 * ```
 */
export function deviceModel(
  opts: Pick<HostOptions, "logicalBlockSize" | "queueSize" | "queues"> & {
    block: { discard?: "unmap" | "ignore" };
  },
  image: BlkImageInfo,
): VirtioBlkOptions {
  const lbs = opts.logicalBlockSize;
  const sectorsPerBlock = lbs / 512;
  const capacity = Math.floor(image.length / lbs) * sectorsPerBlock;
  const readOnly = image.readOnly;
  const align = Math.max(lbs, image.requestAlignment);
  const maxSectors = 0x3fffff & ~(sectorsPerBlock - 1); // 2 GiB - 512 B, block-aligned
  return {
    capacity,
    readOnly,
    blkSize: lbs,
    // QEMU's queue_size - 2, bounded by IOV_MAX (what one preadv/io_submit takes).
    segMax: segMaxForQueueSize(opts.queueSize),
    topology: {
      physicalBlockExp: Math.log2(align / lbs),
      alignmentOffset: 0,
      minIoSize: 1,
      optIoSize: 0,
    },
    writeback: true,
    flush: true,
    numQueues: opts.queues,
    // Offered on read-only exports too (as qemu-storage-daemon): the requests get IOERR.
    discard: { maxSectors, maxSeg: 32, sectorAlignment: sectorsPerBlock },
    writeZeroes: { maxSectors, maxSeg: 32, mayUnmap: opts.block.discard === "unmap" },
  };
}
