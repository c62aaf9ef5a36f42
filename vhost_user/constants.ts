/**
 * vhost-user protocol constants (QEMU docs/interop/vhost-user.rst), with the
 * spec's names.
 *
 * @module
 */

/** Protocol version carried in the low 2 bits of every header's flags ("Header"). */
export const VHOST_USER_VERSION = 0x1;
/** Header flags: mask of the version bits. */
export const VHOST_USER_VERSION_MASK = 0x3;
/** Header flags: set on every reply from the back-end. */
export const VHOST_USER_REPLY_MASK = 0x4;
/** Header flags: the front-end wants a REPLY_ACK reply ("REPLY_ACK"). */
export const VHOST_USER_NEED_REPLY_MASK = 0x8;
/** Size of the message header: request, flags, size (3 x u32). */
export const VHOST_USER_HDR_SIZE = 12;
/**
 * The largest payload this implementation accepts. The biggest message type
 * we parse (SET_MEM_TABLE with 8 regions) is 264 bytes; anything above a page
 * is treated as a corrupt or hostile stream.
 */
export const VHOST_USER_MAX_PAYLOAD = 4096;
/** Regions in a SET_MEM_TABLE message (and fds in any one message). */
export const VHOST_MEMORY_BASELINE_NREGIONS = 8;
/** Bytes of one memory region description (4 x u64). */
export const VHOST_USER_MEMORY_REGION_SIZE = 32;
/** Largest virtio config space transferred by GET/SET_CONFIG ("Virtio device config space"). */
export const VHOST_USER_MAX_CONFIG_SIZE = 256;
/** Bytes before the payload of a config message: offset, size, flags (3 x u32). */
export const VHOST_USER_CONFIG_HDR_SIZE = 12;
/** SET_VRING_KICK/CALL/ERR payload: bits 0-7 are the ring index. */
export const VHOST_USER_VRING_IDX_MASK = 0xff;
/** SET_VRING_KICK/CALL/ERR payload: bit 8 = no fd attached (poll instead). */
export const VHOST_USER_VRING_NOFD_MASK = 0x100;
/** GET/SET_CONFIG flags: a write from the guest to a writable field. */
export const VHOST_SET_CONFIG_TYPE_FRONTEND = 0;
/** GET/SET_CONFIG flags: restoring state during live migration. */
export const VHOST_SET_CONFIG_TYPE_MIGRATION = 1;
/** SET_VRING_ADDR flags: log writes to the used ring. */
export const VHOST_VRING_F_LOG = 0x1;

/** Virtio feature bit 30, reused by vhost-user: GET/SET_PROTOCOL_FEATURES are supported. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;

// Protocol feature bits ("Protocol features").
/** Protocol feature: multiple queues, GET_QUEUE_NUM. */
export const VHOST_USER_PROTOCOL_F_MQ = 0;
/** Protocol feature: dirty log in shared memory. */
export const VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1;
/** Protocol feature: SEND_RARP. */
export const VHOST_USER_PROTOCOL_F_RARP = 2;
/** Protocol feature: NEED_REPLY on any request. */
export const VHOST_USER_PROTOCOL_F_REPLY_ACK = 3;
/** Protocol feature: NET_SET_MTU. */
export const VHOST_USER_PROTOCOL_F_MTU = 4;
/** Protocol feature: back-end request channel (SET_BACKEND_REQ_FD). */
export const VHOST_USER_PROTOCOL_F_BACKEND_REQ = 5;
/** Protocol feature: SET_VRING_ENDIAN. */
export const VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = 6;
/** Protocol feature: crypto sessions. */
export const VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = 7;
/** Protocol feature: postcopy userfaultfd. */
export const VHOST_USER_PROTOCOL_F_PAGEFAULT = 8;
/** Protocol feature: GET/SET_CONFIG. */
export const VHOST_USER_PROTOCOL_F_CONFIG = 9;
/** Protocol feature: fds on the back-end request channel. */
export const VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = 10;
/** Protocol feature: host notifiers. */
export const VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = 11;
/** Protocol feature: inflight I/O tracking shared memory. */
export const VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 12;
/** Protocol feature: RESET_DEVICE. */
export const VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13;
/** Protocol feature: in-band kick/call messages. */
export const VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 14;
/** Protocol feature: GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG. */
export const VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15;
/** Protocol feature: SET_STATUS/GET_STATUS. */
export const VHOST_USER_PROTOCOL_F_STATUS = 16;

// Front-end request codes ("Front-end message types").
/** Get the virtio feature bits (reply u64). */
export const VHOST_USER_GET_FEATURES = 1;
/** Set the acknowledged virtio feature bits (u64). */
export const VHOST_USER_SET_FEATURES = 2;
/** The sender owns the session. */
export const VHOST_USER_SET_OWNER = 3;
/** Deprecated: disable all rings. */
export const VHOST_USER_RESET_OWNER = 4;
/** Memory regions with one fd each. */
export const VHOST_USER_SET_MEM_TABLE = 5;
/** Dirty log shared memory. */
export const VHOST_USER_SET_LOG_BASE = 6;
/** Dirty log eventfd. */
export const VHOST_USER_SET_LOG_FD = 7;
/** Ring size (vring state). */
export const VHOST_USER_SET_VRING_NUM = 8;
/** Ring addresses (vring address). */
export const VHOST_USER_SET_VRING_ADDR = 9;
/** Next avail index to process (vring state). */
export const VHOST_USER_SET_VRING_BASE = 10;
/** Stop the ring; reply with its next avail index (vring state). */
export const VHOST_USER_GET_VRING_BASE = 11;
/** Kick eventfd (u64 index | NOFD). */
export const VHOST_USER_SET_VRING_KICK = 12;
/** Call eventfd (u64 index | NOFD). */
export const VHOST_USER_SET_VRING_CALL = 13;
/** Error eventfd (u64 index | NOFD). */
export const VHOST_USER_SET_VRING_ERR = 14;
/** Get the protocol feature bits (reply u64). */
export const VHOST_USER_GET_PROTOCOL_FEATURES = 15;
/** Set the acknowledged protocol feature bits (u64). */
export const VHOST_USER_SET_PROTOCOL_FEATURES = 16;
/** Maximum number of queues (reply u64). */
export const VHOST_USER_GET_QUEUE_NUM = 17;
/** Enable (1) or disable (0) a ring (vring state). */
export const VHOST_USER_SET_VRING_ENABLE = 18;
/** Net: broadcast a RARP. */
export const VHOST_USER_SEND_RARP = 19;
/** Net: MTU. */
export const VHOST_USER_NET_SET_MTU = 20;
/** Back-end request channel socket (one fd). */
export const VHOST_USER_SET_BACKEND_REQ_FD = 21;
/** IOTLB update/invalidate. */
export const VHOST_USER_IOTLB_MSG = 22;
/** Legacy ring endianness (vring state). */
export const VHOST_USER_SET_VRING_ENDIAN = 23;
/** Read device config space (config; reply config, size 0 on error). */
export const VHOST_USER_GET_CONFIG = 24;
/** Write device config space (config). */
export const VHOST_USER_SET_CONFIG = 25;
/** Crypto. */
export const VHOST_USER_CREATE_CRYPTO_SESSION = 26;
/** Crypto. */
export const VHOST_USER_CLOSE_CRYPTO_SESSION = 27;
/** Postcopy. */
export const VHOST_USER_POSTCOPY_ADVISE = 28;
/** Postcopy. */
export const VHOST_USER_POSTCOPY_LISTEN = 29;
/** Postcopy. */
export const VHOST_USER_POSTCOPY_END = 30;
/** Inflight tracking buffer (get). */
export const VHOST_USER_GET_INFLIGHT_FD = 31;
/** Inflight tracking buffer (set). */
export const VHOST_USER_SET_INFLIGHT_FD = 32;
/** GPU socket. */
export const VHOST_USER_GPU_SET_SOCKET = 33;
/** Disable all rings and reset device state. */
export const VHOST_USER_RESET_DEVICE = 34;
/** In-band kick (vring state). */
export const VHOST_USER_VRING_KICK = 35;
/** Maximum memory slots (reply u64). */
export const VHOST_USER_GET_MAX_MEM_SLOTS = 36;
/** Add one memory region (one fd). */
export const VHOST_USER_ADD_MEM_REG = 37;
/** Remove one memory region. */
export const VHOST_USER_REM_MEM_REG = 38;
/** Device status (u64). */
export const VHOST_USER_SET_STATUS = 39;
/** Device status (reply u64). */
export const VHOST_USER_GET_STATUS = 40;

const REQUEST_NAMES: readonly string[] = [
  "NONE",
  "GET_FEATURES",
  "SET_FEATURES",
  "SET_OWNER",
  "RESET_OWNER",
  "SET_MEM_TABLE",
  "SET_LOG_BASE",
  "SET_LOG_FD",
  "SET_VRING_NUM",
  "SET_VRING_ADDR",
  "SET_VRING_BASE",
  "GET_VRING_BASE",
  "SET_VRING_KICK",
  "SET_VRING_CALL",
  "SET_VRING_ERR",
  "GET_PROTOCOL_FEATURES",
  "SET_PROTOCOL_FEATURES",
  "GET_QUEUE_NUM",
  "SET_VRING_ENABLE",
  "SEND_RARP",
  "NET_SET_MTU",
  "SET_BACKEND_REQ_FD",
  "IOTLB_MSG",
  "SET_VRING_ENDIAN",
  "GET_CONFIG",
  "SET_CONFIG",
  "CREATE_CRYPTO_SESSION",
  "CLOSE_CRYPTO_SESSION",
  "POSTCOPY_ADVISE",
  "POSTCOPY_LISTEN",
  "POSTCOPY_END",
  "GET_INFLIGHT_FD",
  "SET_INFLIGHT_FD",
  "GPU_SET_SOCKET",
  "RESET_DEVICE",
  "VRING_KICK",
  "GET_MAX_MEM_SLOTS",
  "ADD_MEM_REG",
  "REM_MEM_REG",
  "SET_STATUS",
  "GET_STATUS",
];

/** The largest front-end request code this implementation knows. */
export const VHOST_USER_MAX_REQUEST = REQUEST_NAMES.length - 1;

/**
 * `VHOST_USER_<NAME>` for a front-end request code, or `REQUEST_<n>` for an
 * unknown one (for errors and logs).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { requestName, VHOST_USER_SET_MEM_TABLE } from "./constants.ts";
 * assert.equal(requestName(VHOST_USER_SET_MEM_TABLE), "VHOST_USER_SET_MEM_TABLE");
 * assert.equal(requestName(999), "REQUEST_999");
 * ```
 */
export function requestName(request: number): string {
  return request >= 1 && request <= VHOST_USER_MAX_REQUEST
    ? `VHOST_USER_${REQUEST_NAMES[request]}`
    : `REQUEST_${request}`;
}

/**
 * Back-end request (sent by the back-end on the SET_BACKEND_REQ_FD channel):
 * the device config changed; the front-end re-reads it (GET_CONFIG) and
 * tells the guest (vhost-user.rst, "Back-end message types").
 */
export const VHOST_USER_BACKEND_CONFIG_CHANGE_MSG = 2;
