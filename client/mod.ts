/**
 * client/: the built-in vhost-user-blk front-end. It plays the part QEMU and a
 * guest's virtio_blk driver play together: connects to a back-end's socket,
 * shares guest RAM (memfd), sets up the rings and keeps requests in flight
 * (`VhostUserBlkClient`, `BlkQueue`), runs workloads and verifies what it
 * wrote (`runWorkload`, `verify`). Used by functional tests and the demo; the
 * benchmarks use the C load generator in bench/c/blkgen.
 *
 * Not for: the back-end (dataplane/), the vhost-user codec (vhost_user/).
 *
 * @module
 */

export * from "./blk_client.ts";
export * from "./workload.ts";
