/**
 * virtio/: the device side of virtio 1.2 for a vhost-user-blk backend. The
 * guest's memory map ({@link GuestMemory}: vhost-user memory table, address
 * translation with bounds checks), split virtqueues ({@link Virtqueue},
 * {@link DescriptorChain}: section 2.7 with indirect descriptors and
 * EVENT_IDX; {@link SplitInflightRegion}: the inflight log vhost-user's
 * INFLIGHT_SHMFD keeps across a device restart), and the virtio-blk device model (section 5.2: request parsing,
 * config space, feature bits, GET_ID).
 *
 * Everything that comes from the guest is untrusted here: a chain that cannot
 * be followed breaks the ring (typed {@link DescriptorChainError} /
 * {@link VirtqueueError}); a chain with an unusable buffer, or a bad request,
 * gets IOERR/UNSUPP when its status byte can be written
 * ({@link requestErrorStatus}); nothing is ever read or written outside the
 * guest's memory regions.
 *
 * Not for: executing requests (block/), threads, sockets and the vhost-user
 * protocol (dataplane/). Packed virtqueues are not implemented.
 *
 * @module
 */

export * from "./constants.ts";
export * from "./blk/constants.ts";
export {
  GuestMemory,
  GuestMemoryError,
  type GuestMemoryErrorKind,
  type MappedMemoryRegion,
  type MemoryRegion,
} from "./guest_memory.ts";
export {
  BUFFER_ERRORS,
  DescriptorChain,
  DescriptorChainError,
  type DescriptorChainErrorKind,
} from "./descriptor_chain.ts";
export {
  Virtqueue,
  VirtqueueError,
  type VirtqueueErrorKind,
  type VirtqueueOptions,
} from "./virtqueue.ts";
export {
  INFLIGHT_ALIGNMENT,
  INFLIGHT_VERSION,
  inflightQueueRegionSize,
  SplitInflightRegion,
} from "./inflight_region.ts";
export {
  type BlkRequestLimits,
  blkRequestLimits,
  configWriteback,
  DEFAULT_MAX_QUEUE_SIZE,
  DEFAULT_SEG_MAX,
  encodeVirtioBlkConfig,
  MAX_RANGE_SEG,
  segMaxForQueueSize,
  VIRTIO_BLK_CONFIG,
  virtioBlkFeatures,
  type VirtioBlkOptions,
} from "./blk/config.ts";
export {
  INITIAL_SEGMENTS,
  parseBlkRequest,
  REQUEST_BROKEN,
  RequestError,
  type RequestErrorKind,
  requestErrorStatus,
  VIRTIO_BLK_MAX_REQUEST_BYTES,
  VirtioBlkRequest,
} from "./blk/request.ts";
export { blkIdBytes, writeBlkId } from "./blk/id.ts";

// Errors thrown in an IOThread arrive on the main thread as these classes.
import { registerErrorClass } from "../aio/mod.ts";
import { GuestMemoryError } from "./guest_memory.ts";
import { DescriptorChainError } from "./descriptor_chain.ts";
import { VirtqueueError } from "./virtqueue.ts";
import { RequestError } from "./blk/request.ts";
registerErrorClass("GuestMemoryError", GuestMemoryError);
registerErrorClass("DescriptorChainError", DescriptorChainError);
registerErrorClass("VirtqueueError", VirtqueueError);
registerErrorClass("RequestError", RequestError);
