/**
 * Constants of the virtio 1.2 block device (section 5.2): feature bits,
 * request types, status values and sizes. Names are the spec's.
 *
 * @module
 */

/** 5.2.3: maximum size of any single segment is in `size_max`. */
export const VIRTIO_BLK_F_SIZE_MAX = 1;
/** 5.2.3: maximum number of segments in a request is in `seg_max`. */
export const VIRTIO_BLK_F_SEG_MAX = 2;
/** 5.2.3: disk-style geometry is in `geometry`. */
export const VIRTIO_BLK_F_GEOMETRY = 4;
/** 5.2.3: the device is read-only. */
export const VIRTIO_BLK_F_RO = 5;
/** 5.2.3: the block size of the disk is in `blk_size`. */
export const VIRTIO_BLK_F_BLK_SIZE = 6;
/** 5.2.3: cache flush command support (VIRTIO_BLK_T_FLUSH). */
export const VIRTIO_BLK_F_FLUSH = 9;
/** 5.2.3: optimal I/O alignment information is in `topology`. */
export const VIRTIO_BLK_F_TOPOLOGY = 10;
/** 5.2.3: the driver can toggle writeback/writethrough through `writeback`. */
export const VIRTIO_BLK_F_CONFIG_WCE = 11;
/** 5.2.3: more than one request queue; the count is in `num_queues`. */
export const VIRTIO_BLK_F_MQ = 12;
/** 5.2.3: discard command support; limits in `max_discard_*`. */
export const VIRTIO_BLK_F_DISCARD = 13;
/** 5.2.3: write zeroes command support; limits in `max_write_zeroes_*`. */
export const VIRTIO_BLK_F_WRITE_ZEROES = 14;

/** 5.2.6: read (device writes the data-in buffers). */
export const VIRTIO_BLK_T_IN = 0;
/** 5.2.6: write (device reads the data-out buffers). */
export const VIRTIO_BLK_T_OUT = 1;
/** 5.2.6: flush the volatile write cache. */
export const VIRTIO_BLK_T_FLUSH = 4;
/** 5.2.6: get the device ID string (VIRTIO_BLK_ID_BYTES bytes). */
export const VIRTIO_BLK_T_GET_ID = 8;
/** 5.2.6: discard ranges (struct virtio_blk_discard_write_zeroes segments). */
export const VIRTIO_BLK_T_DISCARD = 11;
/** 5.2.6: write zeroes to ranges (same segment layout as discard). */
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;

/** 5.2.6: status byte, success. */
export const VIRTIO_BLK_S_OK = 0;
/** 5.2.6: status byte, device or driver error. */
export const VIRTIO_BLK_S_IOERR = 1;
/** 5.2.6: status byte, request unsupported by the device. */
export const VIRTIO_BLK_S_UNSUPP = 2;

/** 5.2.6: discard/write-zeroes segment flag: the range may be deallocated. */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
/** 5.2.6: length of the device ID returned by VIRTIO_BLK_T_GET_ID. */
export const VIRTIO_BLK_ID_BYTES = 20;
/** 5.2.6: size of the request header (struct virtio_blk_outhdr: type, ioprio, sector). */
export const VIRTIO_BLK_OUTHDR_SIZE = 16;
/** 5.2.6: size of one discard / write zeroes segment (sector u64, num_sectors u32, flags u32). */
export const VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE = 16;
/** 5.2.4: `capacity` and `sector` are in units of 512 bytes. */
export const VIRTIO_BLK_SECTOR_SIZE = 512;
/** 5.2.4: log2 of {@link VIRTIO_BLK_SECTOR_SIZE}. */
export const VIRTIO_BLK_SECTOR_BITS = 9;
