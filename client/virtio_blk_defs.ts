/**
 * The virtio facts the built-in guest driver needs (virtio 1.2: 2.7 split
 * virtqueues, 5.2 block device), kept here so the front-end does not depend
 * on the device model it tests.
 *
 * @module
 */

/** Feature: the device supports VIRTIO 1.x (6.1). */
export const VIRTIO_F_VERSION_1 = 32;
/** Feature: indirect descriptors (2.7.5.3). */
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
/** Feature: used_event / avail_event notification suppression (2.7.7, 2.7.10). */
export const VIRTIO_RING_F_EVENT_IDX = 29;

/** Block feature: size_max is valid. */
export const VIRTIO_BLK_F_SIZE_MAX = 1;
/** Block feature: seg_max is valid. */
export const VIRTIO_BLK_F_SEG_MAX = 2;
/** Block feature: geometry is valid. */
export const VIRTIO_BLK_F_GEOMETRY = 4;
/** Block feature: read-only device. */
export const VIRTIO_BLK_F_RO = 5;
/** Block feature: blk_size is valid. */
export const VIRTIO_BLK_F_BLK_SIZE = 6;
/** Block feature: flush command. */
export const VIRTIO_BLK_F_FLUSH = 9;
/** Block feature: topology is valid. */
export const VIRTIO_BLK_F_TOPOLOGY = 10;
/** Block feature: writeback mode is configurable. */
export const VIRTIO_BLK_F_CONFIG_WCE = 11;
/** Block feature: num_queues is valid. */
export const VIRTIO_BLK_F_MQ = 12;
/** Block feature: discard command. */
export const VIRTIO_BLK_F_DISCARD = 13;
/** Block feature: write-zeroes command. */
export const VIRTIO_BLK_F_WRITE_ZEROES = 14;

/** Request type: read. */
export const VIRTIO_BLK_T_IN = 0;
/** Request type: write. */
export const VIRTIO_BLK_T_OUT = 1;
/** Request type: flush. */
export const VIRTIO_BLK_T_FLUSH = 4;
/** Request type: device id string (20 bytes). */
export const VIRTIO_BLK_T_GET_ID = 8;
/** Request type: discard. */
export const VIRTIO_BLK_T_DISCARD = 11;
/** Request type: write zeroes. */
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;

/** Status: success. */
export const VIRTIO_BLK_S_OK = 0;
/** Status: I/O error. */
export const VIRTIO_BLK_S_IOERR = 1;
/** Status: unsupported request. */
export const VIRTIO_BLK_S_UNSUPP = 2;

/** Length of the GET_ID string. */
export const VIRTIO_BLK_ID_BYTES = 20;
/** Sector size of every virtio-blk offset. */
export const SECTOR_SIZE = 512;
/** write-zeroes flag: the device may unmap. */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

/** Descriptor flag: the chain continues in `next`. */
export const VIRTQ_DESC_F_NEXT = 1;
/** Descriptor flag: device writes (driver reads) this buffer. */
export const VIRTQ_DESC_F_WRITE = 2;
/** avail.flags: please do not interrupt (without EVENT_IDX). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** used.flags: please do not kick (without EVENT_IDX). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;

/** `struct virtio_blk_config` offsets (5.2.4) the client reads. */
export const VIRTIO_BLK_CONFIG = {
  capacity: 0,
  size_max: 8,
  seg_max: 12,
  blk_size: 20,
  physical_block_exp: 24,
  writeback: 32,
  num_queues: 34,
  max_discard_sectors: 36,
  max_discard_seg: 40,
  discard_sector_alignment: 44,
  max_write_zeroes_sectors: 48,
  max_write_zeroes_seg: 52,
  write_zeroes_may_unmap: 56,
  /** Bytes up to and including write_zeroes_may_unmap + padding. */
  size: 60,
} as const;

/**
 * vring_need_event (2.7.10): whether moving an index from `oldIdx` to
 * `newIdx` passes `eventIdx`, i.e. the other side asked to be notified.
 * Hot path.
 *
 * @example
 * ```ts
 * import { vringNeedEvent } from "./virtio_blk_defs.ts";
 * console.assert(vringNeedEvent(5, 6, 5) && !vringNeedEvent(9, 6, 5));
 * ```
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}
