/**
 * block/: QEMU's block layer reduced to what a virtio-blk dataplane needs:
 * BlockBackend, format (raw) over protocol drivers (file, null), and the I/O
 * engines for `file` (threads, Linux AIO, io_uring).
 *
 * Not for: guest memory or virtqueues (virtio/), threads and sockets
 * (dataplane/).
 *
 * @module
 */

export { IoVector } from "./io_vector.ts";
