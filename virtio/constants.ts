/**
 * Constants of the virtio 1.2 specification that every device shares:
 * feature bits (section 6, "Reserved Feature Bits") and the split virtqueue
 * layout (section 2.7). Names are the spec's; feature bits are bit numbers,
 * use {@link featureBit} to turn one into a mask.
 *
 * @module
 */

/** 2.7.5 / 6: the driver may use descriptors with VRING_DESC_F_INDIRECT (bit 28). */
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
/** 2.7.7 / 2.7.10 / 6: used_event and avail_event notification suppression (bit 29). */
export const VIRTIO_RING_F_EVENT_IDX = 29;
/** 6: compliance with the virtio 1.x specification, no legacy (bit 32). */
export const VIRTIO_F_VERSION_1 = 32;
/** 6: the device is behind an IOMMU / platform access restrictions (bit 33). */
export const VIRTIO_F_ACCESS_PLATFORM = 33;
/** 6 / 2.8: packed virtqueue layout (bit 34); not implemented here. */
export const VIRTIO_F_RING_PACKED = 34;
/** 6: buffers are used in the order they were made available (bit 35). */
export const VIRTIO_F_IN_ORDER = 35;

/** 2.7.5: descriptor flag, the buffer continues via the `next` field. */
export const VRING_DESC_F_NEXT = 1;
/** 2.7.5: descriptor flag, the buffer is device write-only (otherwise read-only). */
export const VRING_DESC_F_WRITE = 2;
/** 2.7.5.3: descriptor flag, the buffer is a table of indirect descriptors. */
export const VRING_DESC_F_INDIRECT = 4;

/** 2.7.6 / 2.7.7: avail ring flag, the driver does not want used-buffer notifications. */
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
/** 2.7.8 / 2.7.10: used ring flag, the device does not want available-buffer notifications. */
export const VRING_USED_F_NO_NOTIFY = 1;

/** 2.7: size in bytes of one descriptor (struct virtq_desc). */
export const VRING_DESC_SIZE = 16;
/** 2.7: size in bytes of one used ring element (struct virtq_used_elem). */
export const VRING_USED_ELEM_SIZE = 8;
/** 2.7: required alignment of the descriptor table. */
export const VRING_DESC_ALIGN = 16;
/** 2.7: required alignment of the available ring. */
export const VRING_AVAIL_ALIGN = 2;
/** 2.7: required alignment of the used ring. */
export const VRING_USED_ALIGN = 4;
/** 2.7: the largest split queue size (a power of two up to 32768). */
export const VIRTQUEUE_MAX_SIZE = 32768;

/**
 * The 64-bit mask for feature bit `bit` (features are negotiated as u64).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { featureBit, VIRTIO_F_VERSION_1 } from "./constants.ts";
 * assert.equal(featureBit(VIRTIO_F_VERSION_1), 1n << 32n);
 * ```
 */
export function featureBit(bit: number): bigint {
  return 1n << BigInt(bit);
}

/**
 * Whether feature bit `bit` is set in the 64-bit feature set `features`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { featureBit, hasFeature, VIRTIO_RING_F_EVENT_IDX } from "./constants.ts";
 * assert(hasFeature(featureBit(VIRTIO_RING_F_EVENT_IDX), VIRTIO_RING_F_EVENT_IDX));
 * ```
 */
export function hasFeature(features: bigint, bit: number): boolean {
  return ((features >> BigInt(bit)) & 1n) === 1n;
}
