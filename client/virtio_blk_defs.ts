/**
 * The virtio facts the built-in guest driver needs (virtio 1.2: 2.7 split
 * virtqueues, 5.2 block device). The spec's constants are defined once, in
 * virtio/ (one constants file per spec), and re-exported here under the names
 * the client uses; the driver logic itself (rings, requests) stays the
 * client's own, so the front-end does not share code paths with the device
 * model it tests.
 *
 * @module
 */

export {
  VIRTIO_BLK_CONFIG,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_GEOMETRY,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_TOPOLOGY,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  /** Sector size of every virtio-blk offset (5.2.4). */
  VIRTIO_BLK_SECTOR_SIZE as SECTOR_SIZE,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  /** avail.flags: please do not interrupt (without EVENT_IDX; 2.7.7). */
  VRING_AVAIL_F_NO_INTERRUPT as VIRTQ_AVAIL_F_NO_INTERRUPT,
  /** Descriptor flag: the chain continues in `next` (2.7.5). */
  VRING_DESC_F_NEXT as VIRTQ_DESC_F_NEXT,
  /** Descriptor flag: device writes (driver reads) this buffer (2.7.5). */
  VRING_DESC_F_WRITE as VIRTQ_DESC_F_WRITE,
  /** used.flags: please do not kick (without EVENT_IDX; 2.7.10). */
  VRING_USED_F_NO_NOTIFY as VIRTQ_USED_F_NO_NOTIFY,
} from "../virtio/mod.ts";

/**
 * vring_need_event (2.7.10): whether moving an index from `oldIdx` to
 * `newIdx` passes `eventIdx`, i.e. the other side asked to be notified.
 * Hot path.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { vringNeedEvent } from "./virtio_blk_defs.ts";
 * assert(vringNeedEvent(5, 6, 5));
 * assert(!vringNeedEvent(9, 6, 5));
 * ```
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}
