/**
 * block/nbd/: the NBD client driver's own classes (QEMU block/nbd.c,
 * nbd/client.c), for tests that drive it directly. block/mod.ts does not
 * load them: BlockBackend.open imports the driver when it first opens an
 * nbd node (see block/mod.ts); the wire protocol, addresses, errors and
 * errno mapping are in block/mod.ts.
 *
 * @module
 */

export { NbdDriver } from "./nbd_driver.ts";
export { NbdClient, type NbdClientOptions, type NbdClientState } from "./nbd_client.ts";
export { NbdError, type NbdErrorKind } from "./nbd_error.ts";
