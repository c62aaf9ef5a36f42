/**
 * vhost_user/: the vhost-user layer (QEMU docs/interop/vhost-user.rst), between
 * virtio/ and dataplane/. Protocol
 * constants, the message codec, the per-front-end connection state machine,
 * the listening server, the {@link VhostUserBackend} seam the connection
 * calls, and {@link VhostUserHandler}: the back-end half that owns the ring
 * state (and the INFLIGHT_SHMFD region) over a {@link VhostUserDevice}, which
 * implements only device concerns. Also used by the built-in front-end in
 * `client/`.
 *
 * Not for: ring processing or block I/O (virtio/, block/); the server only
 * passes checked values to its backend.
 *
 * @module
 */

export * from "./constants.ts";
export * from "./message.ts";
export type {
  VhostUserBackend,
  VhostUserInflight,
  VhostUserMemoryRegion,
  VhostUserVringAddr,
} from "./backend.ts";
export {
  type VhostUserDevice,
  VhostUserHandler,
  type VhostUserHandlerOptions,
  type VringInflight,
  type VringSetup,
  type VringUpdate,
} from "./handler.ts";
export { VhostUserConnection, type VhostUserConnectionOptions } from "./connection.ts";
export { BACKEND_REPLY_TIMEOUT_MS, VhostUserBackendChannel } from "./backend_channel.ts";
export { type FdWatcher, VhostUserServer, type VhostUserServerOptions } from "./server.ts";

// Errors thrown in an IOThread arrive on the main thread as these classes.
import { registerErrorClass } from "../aio/mod.ts";
import { VhostUserError } from "./message.ts";
registerErrorClass("VhostUserError", VhostUserError);
