/**
 * Ceph's librados and librbd (Debian's librados2 / librbd1), opened lazily so a
 * machine without them still loads `sys/mod.ts`: the first call dlopens
 * `librados.so.2` and `librbd.so.1`, and {@link librbdLoadError} says why that
 * failed without throwing.
 *
 * Completions never run JavaScript on a librbd thread: a completion is created
 * with a NULL callback, the image announces finished ones on an eventfd
 * ({@link rbdSetImageNotification}, `EVENT_TYPE_EVENTFD`) and the owner's
 * AioContext reaps them with {@link rbdPollIoEvents}, as QEMU's block/rbd.c
 * did with `rbd_set_image_notification`. Handles (cluster, ioctx, image) are
 * pointers; completions are their address as a bigint, so the hot calls stay
 * on Deno's fast FFI path. librbd returns `-errno`: the set-up wrappers throw a
 * {@link SysError}, the per-request ones return the code.
 *
 * Connecting and opening talk to the monitors and OSDs: {@link radosConnect},
 * {@link rbdOpen} and {@link rbdClose} run on a Deno blocking thread and
 * return a Promise, so the calling thread's event loop keeps running.
 *
 * @module
 */

import { cString } from "./pointer.ts";
import { SysError } from "./sys_error.ts";

/** `rbd_set_image_notification` type: the fd is an eventfd (librbd.h). */
export const EVENT_TYPE_EVENTFD = 2;
/** `rbd_aio_write_zeroes` zero_flags: keep the range allocated (librbd.h). */
export const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1;

const RADOS_SYMBOLS = {
  rados_create: { parameters: ["buffer", "buffer"], result: "i32" },
  rados_conf_read_file: { parameters: ["pointer", "buffer"], result: "i32" },
  rados_conf_set: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  rados_connect: { parameters: ["pointer"], result: "i32", nonblocking: true },
  rados_shutdown: { parameters: ["pointer"], result: "void", nonblocking: true },
  rados_ioctx_create: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  rados_ioctx_set_namespace: { parameters: ["pointer", "buffer"], result: "void" },
  rados_ioctx_destroy: { parameters: ["pointer"], result: "void" },
} as const;

const RBD_SYMBOLS = {
  rbd_open: {
    parameters: ["pointer", "buffer", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  rbd_open_read_only: {
    parameters: ["pointer", "buffer", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  rbd_close: { parameters: ["pointer"], result: "i32", nonblocking: true },
  rbd_get_size: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_resize: { parameters: ["pointer", "u64"], result: "i32", nonblocking: true },
  rbd_set_image_notification: { parameters: ["pointer", "i32", "i32"], result: "i32" },
  rbd_aio_create_completion: { parameters: ["usize", "pointer", "buffer"], result: "i32" },
  rbd_aio_get_arg: { parameters: ["u64"], result: "usize" },
  rbd_aio_get_return_value: { parameters: ["u64"], result: "isize" },
  rbd_aio_release: { parameters: ["u64"], result: "void" },
  rbd_aio_readv: { parameters: ["pointer", "buffer", "i32", "u64", "u64"], result: "i32" },
  rbd_aio_writev: { parameters: ["pointer", "buffer", "i32", "u64", "u64"], result: "i32" },
  rbd_aio_discard: { parameters: ["pointer", "u64", "u64", "u64"], result: "i32" },
  rbd_aio_write_zeroes: {
    parameters: ["pointer", "u64", "usize", "u64", "i32", "i32"],
    result: "i32",
  },
  rbd_aio_flush: { parameters: ["pointer", "u64"], result: "i32" },
  rbd_poll_io_events: { parameters: ["pointer", "buffer", "i32"], result: "i32" },
} as const;

type Rados = Deno.DynamicLibrary<typeof RADOS_SYMBOLS>["symbols"];
type Rbd = Deno.DynamicLibrary<typeof RBD_SYMBOLS>["symbols"];

let rados: Rados | null = null;
let rbd: Rbd | null = null;
let loadError: string | null = null;

function load(): void {
  if (rbd || loadError) return;
  try {
    rados = Deno.dlopen("librados.so.2", RADOS_SYMBOLS).symbols;
    rbd = Deno.dlopen("librbd.so.1", RBD_SYMBOLS).symbols;
  } catch (e) {
    rados = null;
    loadError = `librbd is not available (install librbd1): ${(e as Error).message}`;
  }
}

function radosLib(): Rados {
  load();
  if (!rados) throw new SysError("dlopen(librados.so.2)", 2, loadError ?? undefined);
  return rados;
}

function rbdLib(): Rbd {
  load();
  if (!rbd) throw new SysError("dlopen(librbd.so.1)", 2, loadError ?? undefined);
  return rbd;
}

/**
 * Why librados/librbd cannot be loaded, or null when they can (loads them).
 *
 * @example
 * ```ts
 * import { librbdLoadError } from "./rbd.ts";
 * const why = librbdLoadError();
 * if (why) console.log(why);
 * ```
 */
export function librbdLoadError(): string | null {
  load();
  return loadError;
}

function ok(call: string, ret: number, detail?: string): void {
  if (ret < 0) throw new SysError(call, -ret, detail);
}

const ptrOut = () => new BigUint64Array(1);
const ptrOf = (out: BigUint64Array): Deno.PointerValue => Deno.UnsafePointer.create(out[0]);

/**
 * A cluster handle (rados_create): `id` is the client id without "client."
 * (null: the configuration's default, admin). Configure it with
 * {@link radosConfReadFile} and {@link radosConfSet}, then {@link radosConnect}.
 *
 * @example
 * ```ts
 * import { librbdLoadError, radosCreate, radosShutdown } from "./rbd.ts";
 * if (!librbdLoadError()) await radosShutdown(radosCreate("admin"));
 * ```
 */
export function radosCreate(id: string | null): Deno.PointerValue {
  const out = ptrOut();
  ok("rados_create", radosLib().rados_create(out, id === null ? null : cString(id)), id ?? "");
  return ptrOf(out);
}

/**
 * Reads a ceph.conf (rados_conf_read_file); null: the default search path
 * ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { librbdLoadError, radosConfReadFile, radosCreate, radosShutdown } from "./rbd.ts";
 * if (!librbdLoadError()) {
 *   const c = radosCreate(null);
 *   assert.throws(() => radosConfReadFile(c, "/nonexistent/ceph.conf"), /ENOENT/);
 *   await radosShutdown(c);
 * }
 * ```
 */
export function radosConfReadFile(cluster: Deno.PointerValue, path: string | null): void {
  const r = radosLib().rados_conf_read_file(cluster, path === null ? null : cString(path));
  ok("rados_conf_read_file", r, path ?? "default search path");
}

/**
 * Sets one configuration option (rados_conf_set), e.g. `mon_host`,
 * `client_mount_timeout`; ENOENT for an unknown option.
 *
 * @example
 * ```ts
 * import { librbdLoadError, radosConfSet, radosCreate, radosShutdown } from "./rbd.ts";
 * if (!librbdLoadError()) {
 *   const c = radosCreate(null);
 *   radosConfSet(c, "client_mount_timeout", "5");
 *   await radosShutdown(c);
 * }
 * ```
 */
export function radosConfSet(cluster: Deno.PointerValue, key: string, value: string): void {
  ok("rados_conf_set", radosLib().rados_conf_set(cluster, cString(key), cString(value)), key);
}

/**
 * Connects to the monitors (rados_connect) on a blocking thread; gives up
 * after the configuration's client_mount_timeout (ETIMEDOUT).
 *
 * @example
 * ```ts
 * import type { radosConnect } from "./rbd.ts";
 * const connect: typeof radosConnect = async () => {};
 * await connect(null);
 * ```
 */
export async function radosConnect(cluster: Deno.PointerValue): Promise<void> {
  ok("rados_connect", await radosLib().rados_connect(cluster));
}

/**
 * Closes a cluster handle (rados_shutdown), on a blocking thread.
 *
 * @example
 * ```ts
 * import { librbdLoadError, radosCreate, radosShutdown } from "./rbd.ts";
 * if (!librbdLoadError()) await radosShutdown(radosCreate(null));
 * ```
 */
export async function radosShutdown(cluster: Deno.PointerValue): Promise<void> {
  await radosLib().rados_shutdown(cluster);
}

/**
 * An I/O context on `pool` (rados_ioctx_create), optionally in a RADOS
 * namespace; ENOENT when the pool does not exist.
 *
 * @example
 * ```ts
 * import type { radosIoctxCreate } from "./rbd.ts";
 * const f: typeof radosIoctxCreate = () => null;
 * f(null, "rbd");
 * ```
 */
export function radosIoctxCreate(
  cluster: Deno.PointerValue,
  pool: string,
  namespace = "",
): Deno.PointerValue {
  const lib = radosLib(), out = ptrOut();
  ok("rados_ioctx_create", lib.rados_ioctx_create(cluster, cString(pool), out), `pool ${pool}`);
  const io = ptrOf(out);
  if (namespace) lib.rados_ioctx_set_namespace(io, cString(namespace));
  return io;
}

/**
 * Releases an I/O context (rados_ioctx_destroy).
 *
 * @example
 * ```ts
 * import type { radosIoctxDestroy } from "./rbd.ts";
 * const f: typeof radosIoctxDestroy = () => {};
 * f(null);
 * ```
 */
export function radosIoctxDestroy(io: Deno.PointerValue): void {
  radosLib().rados_ioctx_destroy(io);
}

/**
 * Opens image `name` (rbd_open, or rbd_open_read_only) at its head or at
 * snapshot `snap` (always read-only), on a blocking thread; ENOENT when the
 * image or the snapshot does not exist.
 *
 * @example
 * ```ts
 * import type { rbdOpen } from "./rbd.ts";
 * const f: typeof rbdOpen = () => Promise.resolve(null);
 * await f(null, "img", false);
 * ```
 */
export async function rbdOpen(
  io: Deno.PointerValue,
  name: string,
  readOnly: boolean,
  snap?: string,
): Promise<Deno.PointerValue> {
  const lib = rbdLib(), out = ptrOut();
  const s = snap === undefined ? null : cString(snap);
  const r = readOnly || snap !== undefined
    ? await lib.rbd_open_read_only(io, cString(name), out, s)
    : await lib.rbd_open(io, cString(name), out, s);
  const call = readOnly || snap !== undefined ? "rbd_open_read_only" : "rbd_open";
  ok(call, r, snap === undefined ? `image ${name}` : `image ${name}@${snap}`);
  return ptrOf(out);
}

/**
 * Closes an image (rbd_close: flushes its cache), on a blocking thread. No
 * request may be in flight.
 *
 * @example
 * ```ts
 * import type { rbdClose } from "./rbd.ts";
 * const f: typeof rbdClose = () => Promise.resolve();
 * await f(null);
 * ```
 */
export async function rbdClose(image: Deno.PointerValue): Promise<void> {
  ok("rbd_close", await rbdLib().rbd_close(image));
}

/**
 * The image's size in bytes (rbd_get_size).
 *
 * @example
 * ```ts
 * import type { rbdGetSize } from "./rbd.ts";
 * const f: typeof rbdGetSize = () => 0;
 * f(null);
 * ```
 */
export function rbdGetSize(image: Deno.PointerValue): number {
  const out = new BigUint64Array(1);
  ok("rbd_get_size", rbdLib().rbd_get_size(image, out));
  return Number(out[0]);
}

/**
 * Grows or shrinks the image (rbd_resize), on a blocking thread.
 *
 * @example
 * ```ts
 * import type { rbdResize } from "./rbd.ts";
 * const f: typeof rbdResize = () => Promise.resolve();
 * await f(null, 1 << 20);
 * ```
 */
export async function rbdResize(image: Deno.PointerValue, size: number): Promise<void> {
  ok("rbd_resize", await rbdLib().rbd_resize(image, BigInt(size)));
}

/**
 * Makes the image write to eventfd `fd` whenever a completion created by
 * {@link rbdAioCreateCompletion} finishes (rbd_set_image_notification); the
 * owner then reaps them with {@link rbdPollIoEvents}.
 *
 * @example
 * ```ts
 * import type { rbdSetImageNotification } from "./rbd.ts";
 * const f: typeof rbdSetImageNotification = () => {};
 * f(null, -1);
 * ```
 */
export function rbdSetImageNotification(image: Deno.PointerValue, fd: number): void {
  ok(
    "rbd_set_image_notification",
    rbdLib().rbd_set_image_notification(image, fd, EVENT_TYPE_EVENTFD),
  );
}

/**
 * A completion with no callback carrying `arg` (rbd_aio_create_completion;
 * keep a pre-built bigint per request slot: converting allocates);
 * its address, for the `rbdAio*` calls. Hot path: one small allocation in
 * librbd; release it with {@link rbdAioRelease} once reaped.
 *
 * @example
 * ```ts
 * import type { rbdAioCreateCompletion } from "./rbd.ts";
 * const f: typeof rbdAioCreateCompletion = () => 1n;
 * f(7n);
 * ```
 */
export function rbdAioCreateCompletion(arg: bigint): bigint {
  const out = completionOut;
  ok("rbd_aio_create_completion", rbdLib().rbd_aio_create_completion(arg, null, out));
  return out[0];
}
const completionOut = new BigUint64Array(1);

/**
 * The `arg` a completion was created with (rbd_aio_get_arg). Hot path.
 *
 * @example
 * ```ts
 * import type { rbdAioGetArg } from "./rbd.ts";
 * const f: typeof rbdAioGetArg = () => 7;
 * f(1n);
 * ```
 */
export function rbdAioGetArg(c: bigint): number {
  return Number(rbdLib().rbd_aio_get_arg(c));
}

/**
 * A finished completion's result: bytes (reads) or 0, or `-errno`
 * (rbd_aio_get_return_value). Hot path.
 *
 * @example
 * ```ts
 * import type { rbdAioGetReturnValue } from "./rbd.ts";
 * const f: typeof rbdAioGetReturnValue = () => 0;
 * f(1n);
 * ```
 */
export function rbdAioGetReturnValue(c: bigint): number {
  return Number(rbdLib().rbd_aio_get_return_value(c));
}

/**
 * Frees a completion (rbd_aio_release). Hot path.
 *
 * @example
 * ```ts
 * import type { rbdAioRelease } from "./rbd.ts";
 * const f: typeof rbdAioRelease = () => {};
 * f(1n);
 * ```
 */
export function rbdAioRelease(c: bigint): void {
  rbdLib().rbd_aio_release(c);
}

/**
 * Reads into the C iovec array `iov` (`iovcnt` entries) from `offset`
 * (rbd_aio_readv); 0 or `-errno`. The array and the buffers must stay alive
 * until the completion is reaped. Hot path.
 *
 * @example
 * ```ts
 * import type { rbdAioReadv } from "./rbd.ts";
 * const f: typeof rbdAioReadv = () => 0;
 * f(null, new Uint8Array(16), 1, 0n, 1n);
 * ```
 */
export function rbdAioReadv(
  image: Deno.PointerValue,
  iov: Uint8Array<ArrayBuffer>,
  iovcnt: number,
  offset: bigint,
  c: bigint,
): number {
  return rbdLib().rbd_aio_readv(image, iov, iovcnt, offset, c);
}

/**
 * Writes the C iovec array `iov` at `offset` (rbd_aio_writev); 0 or
 * `-errno`. Hot path.
 *
 * @example
 * ```ts
 * import type { rbdAioWritev } from "./rbd.ts";
 * const f: typeof rbdAioWritev = () => 0;
 * f(null, new Uint8Array(16), 1, 0n, 1n);
 * ```
 */
export function rbdAioWritev(
  image: Deno.PointerValue,
  iov: Uint8Array<ArrayBuffer>,
  iovcnt: number,
  offset: bigint,
  c: bigint,
): number {
  return rbdLib().rbd_aio_writev(image, iov, iovcnt, offset, c);
}

/**
 * Discards a range (rbd_aio_discard); 0 or `-errno`.
 *
 * @example
 * ```ts
 * import type { rbdAioDiscard } from "./rbd.ts";
 * const f: typeof rbdAioDiscard = () => 0;
 * f(null, 0n, 4096n, 1n);
 * ```
 */
export function rbdAioDiscard(
  image: Deno.PointerValue,
  offset: bigint,
  len: bigint,
  c: bigint,
): number {
  return rbdLib().rbd_aio_discard(image, offset, len, c);
}

/**
 * Makes a range read as zeroes (rbd_aio_write_zeroes); `zeroFlags`
 * {@link RBD_WRITE_ZEROES_FLAG_THICK_PROVISION} keeps it allocated. 0 or `-errno`.
 *
 * @example
 * ```ts
 * import type { rbdAioWriteZeroes } from "./rbd.ts";
 * const f: typeof rbdAioWriteZeroes = () => 0;
 * f(null, 0n, 4096n, 1n, 0);
 * ```
 */
export function rbdAioWriteZeroes(
  image: Deno.PointerValue,
  offset: bigint,
  len: bigint,
  c: bigint,
  zeroFlags: number,
): number {
  return rbdLib().rbd_aio_write_zeroes(image, offset, len, c, zeroFlags, 0);
}

/**
 * Makes completed writes durable (rbd_aio_flush); 0 or `-errno`.
 *
 * @example
 * ```ts
 * import type { rbdAioFlush } from "./rbd.ts";
 * const f: typeof rbdAioFlush = () => 0;
 * f(null, 1n);
 * ```
 */
export function rbdAioFlush(image: Deno.PointerValue, c: bigint): number {
  return rbdLib().rbd_aio_flush(image, c);
}

/**
 * Takes up to `comps.length` finished completions of the image into `comps`
 * (rbd_poll_io_events); how many, or `-errno`. Hot path.
 *
 * @example
 * ```ts
 * import type { rbdPollIoEvents } from "./rbd.ts";
 * const f: typeof rbdPollIoEvents = () => 0;
 * f(null, new BigUint64Array(32));
 * ```
 */
export function rbdPollIoEvents(
  image: Deno.PointerValue,
  comps: BigUint64Array<ArrayBuffer>,
): number {
  return rbdLib().rbd_poll_io_events(image, comps, comps.length);
}
