import { parseArgs } from "node:util";
import { DEFAULT_MAX_QUEUE_SIZE, VIRTQUEUE_MAX_SIZE } from "../virtio/mod.ts";
import {
  type NbdServerAddress,
  parseNbdUri,
  parseRbdFilename,
  THROTTLE_BUCKETS,
  type ThrottleConfig,
  throttleConfigInit,
  throttleIsValid,
} from "../block/mod.ts";

/** Block-layer options as the host passes them to every IOThread's BlockBackend. */
export interface HostBlockOptions {
  driver: "file" | "null-co" | "null-aio" | "nbd" | "rbd";
  filename?: string;
  /** nbd (`--image nbd://HOST:PORT/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`). */
  server?: NbdServerAddress;
  exportName?: string;
  reconnectDelay?: number;
  size?: number;
  /** rbd (from `rbd:POOL/[NAMESPACE/]IMAGE[:conf=PATH][:id=USER][:key=value]`). */
  pool?: string;
  image?: string;
  namespace?: string;
  conf?: string;
  user?: string;
  snapshot?: string;
  rbdConf?: Record<string, string>;
  format: "raw" | "qcow2";
  /** qcow2: QEMU's l2-cache-size (per IOThread). */
  l2CacheSize?: number;
  cache: "none" | "writeback" | "unsafe";
  aio: "threads" | "native" | "io_uring";
  readOnly: boolean;
  discard: "unmap" | "ignore";
}

/** Everything `deno task host` was asked to do, validated. */
export interface HostOptions {
  block: HostBlockOptions;
  socket: string;
  socketMode: number;
  serial: string;
  queues: number;
  iothreads: number;
  logicalBlockSize: number;
  queueSize: number;
  pollMaxNs: number;
  /** aio-max-batch of every IOThread (requests per linux-aio / io_uring submission). */
  aioMaxBatch: number;
  /**
   * Test-only (`--test-hold-completions EVERY:MS`): the completion of every
   * EVERY-th request of each IOThread is held back MS milliseconds, so
   * requests complete out of order (a kill then lands with a later request
   * used and an earlier one not). Never for production.
   */
  testHoldCompletions?: { every: number; ms: number };
  /**
   * Test-only (`--test-break-ring EVERY`): every EVERY-th request popped
   * breaks its ring as a malformed chain would (the connection closes), though
   * the request is sound: for reconnect tests.
   */
  testBreakRing?: number;
  /** `--throttle`: I/O limits over the whole export (all its IOThreads), as a QEMU throttle group. */
  throttle?: ThrottleConfig;
  help: boolean;
}

/** A command-line error: the message is meant for the user as is. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** The `--help` text. */
/**
 * The host's aio-max-batch: QEMU's engines default to 32, but a batch that
 * waits for a whole kick's worth of requests reaches the disk as one burst,
 * and on a virtual disk the answers then come back as one burst too, so the
 * guest and the disk take turns (QD32 4 KiB random reads on this VM's disk:
 * ~40k IOPS submitting every request of a kick at once, ~50k submitting
 * each 4, as qemu-storage-daemon's ~50k, which submits each request alone).
 */
export const DEFAULT_AIO_MAX_BATCH = 4;

export const HOST_USAGE = `Usage: deno task host -- --image IMAGE --socket PATH [options]

Serve a disk image to a VM as a vhost-user-blk backend (QEMU vhost-user-blk-pci,
cloud-hypervisor --disk vhost_user=on).

  --image IMAGE            raw image file or block device, or null-co:SIZE /
                           null-aio:SIZE (e.g. null-co:1G) for the null driver,
                           or an NBD export: nbd://HOST[:PORT]/EXPORT,
                           nbd+unix:///EXPORT?socket=PATH, or a Ceph RBD
                           image: rbd:POOL/IMAGE[:conf=PATH][:id=USER]
  --reconnect-delay SECS   nbd: how long requests wait for a lost NBD
                           server before failing with EIO           [0]
  --socket PATH            Unix socket to listen on (created mode 0600)
  --format FORMAT          raw | qcow2 (never probed)              [raw]
  --l2-cache-size SIZE     qcow2 L2 table cache per IOThread
                           [enough for the whole disk, at most 32M]
  --cache MODE             none (O_DIRECT) | writeback | unsafe   [writeback]
  --aio ENGINE             threads | native | io_uring            [threads]
  --read-only              export read-only (VIRTIO_BLK_F_RO)
  --discard MODE           unmap | ignore                          [unmap]
  --serial STRING          GET_ID serial, at most 20 bytes          [dataplane]
  --queues N               virtqueues, 1..64                        [1]
  --iothreads N            IOThreads the queues are spread over     [1]
  --queue-size N           largest virtqueue a front-end may set up
                           (power of two, up to 32768; seg_max is
                           min(N, 1024) - 2)                        [1024]
  --logical-block-size N   512 or 4096                              [512]
  --poll-max-ns NS         adaptive polling window, 0 disables      [32768]
  --aio-max-batch N        most requests per native/io_uring
                           submission (1..1024)                     [4]
  --socket-mode MODE       octal mode of the socket file            [0600]
  --throttle LIMITS        I/O limits over the export, as a QEMU throttle group:
                           iops-total=N,bps-total=N,... (also -read, -write,
                           -max, -max-length, iops-size)
  --test-hold-completions EVERY:MS
                           tests only: hold every EVERY-th completion
                           back MS ms (out-of-order completion)
  --test-break-ring EVERY  tests only: every EVERY-th request breaks its
                           ring as a malformed one would (connection
                           closes; the request itself is sound)
  -h, --help               this text

qemu-storage-daemon's command line is taken too (many exports, IOThread
objects, a QMP monitor): deno task host -- --blockdev ... --export ...
(see deno task host -- --blockdev x --help)
`;

const SIZE_SUFFIX: Record<string, number> = {
  "": 1,
  K: 1024,
  M: 1024 ** 2,
  G: 1024 ** 3,
  T: 1024 ** 4,
};

/**
 * Parses a size such as `4096`, `512M` or `1G` (binary units, optional `B`/`iB`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseSize } from "./host_options.ts";
 * assert.equal(parseSize("1G"), 1073741824);
 * ```
 */
export function parseSize(text: string): number {
  const m = /^(\d+)\s*([KMGT]?)(?:i?B)?$/i.exec(text.trim());
  if (!m) throw new UsageError(`bad size '${text}' (examples: 4096, 512M, 1G)`);
  const n = Number(m[1]) * SIZE_SUFFIX[m[2].toUpperCase()];
  if (!Number.isSafeInteger(n)) throw new UsageError(`size '${text}' is too large`);
  return n;
}

function intOption(name: string, text: string | undefined, def: number, min: number, max: number) {
  if (text === undefined) return def;
  if (!/^\d+$/.test(text)) throw new UsageError(`--${name} takes a whole number, not '${text}'`);
  const n = Number(text);
  if (n < min || n > max) throw new UsageError(`--${name} must be between ${min} and ${max}`);
  return n;
}

function choice<T extends string>(name: string, text: string | undefined, def: T, all: T[]): T {
  if (text === undefined) return def;
  if (!(all as string[]).includes(text)) {
    throw new UsageError(`--${name} must be one of ${all.join(", ")}, not '${text}'`);
  }
  return text as T;
}

/**
 * Parses and validates the host's command line. Throws {@link UsageError} with a
 * message for the user on any bad flag or value. `what.socket: false` parses
 * the same block and device options for a host without a socket (vm/: the
 * KVM host), where --socket is refused.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseHostArgs } from "./host_options.ts";
 * const o = parseHostArgs(["--image", "null-co:1G", "--socket", "/tmp/x.sock", "--queues", "2"]);
 * assert.equal(o.block.driver, "null-co");
 * assert.equal(o.block.size, 1 << 30);
 * assert.equal(o.queues, 2);
 * ```
 */
export function parseHostArgs(
  args: string[],
  what: { socket?: boolean } = {},
): HostOptions {
  const wantSocket = what.socket ?? true;
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      options: {
        image: { type: "string" },
        socket: { type: "string" },
        format: { type: "string" },
        "l2-cache-size": { type: "string" },
        "reconnect-delay": { type: "string" },
        cache: { type: "string" },
        aio: { type: "string" },
        "read-only": { type: "boolean" },
        discard: { type: "string" },
        serial: { type: "string" },
        queues: { type: "string" },
        iothreads: { type: "string" },
        "queue-size": { type: "string" },
        "logical-block-size": { type: "string" },
        "poll-max-ns": { type: "string" },
        "aio-max-batch": { type: "string" },
        "socket-mode": { type: "string" },
        "test-hold-completions": { type: "string" },
        "test-break-ring": { type: "string" },
        throttle: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const v = parsed.values;
  const help = v.help ?? false;
  if (help) {
    return {
      ...defaults(),
      help: true,
    };
  }
  if (!v.image) throw new UsageError("--image is required (a file, or null-co:SIZE)");
  if (wantSocket && !v.socket) throw new UsageError("--socket is required");
  if (!wantSocket && v.socket !== undefined) {
    throw new UsageError("--socket is not an option of this command");
  }

  let block: HostBlockOptions;
  const nullMatch = /^(null-co|null-aio):(.+)$/.exec(v.image);
  const cache = choice("cache", v.cache, "writeback", ["none", "writeback", "unsafe"]);
  const aio = choice("aio", v.aio, "threads", ["threads", "native", "io_uring"]);
  const format = choice("format", v.format, "raw", ["raw", "qcow2"]);
  const discard = choice("discard", v.discard, "unmap", ["unmap", "ignore"]);
  const readOnly = v["read-only"] ?? false;
  if (format === "qcow2" && nullMatch) {
    throw new UsageError("--format qcow2 needs an image file, not a null driver");
  }
  const isRbd = v.image.startsWith("rbd:");
  if (format === "qcow2" && isRbd) {
    throw new UsageError("--format qcow2 needs an image file, not rbd:");
  }
  if (v["l2-cache-size"] !== undefined && format !== "qcow2") {
    throw new UsageError("--l2-cache-size is a qcow2 option (--format qcow2)");
  }
  const l2CacheSize = v["l2-cache-size"] === undefined ? undefined : parseSize(v["l2-cache-size"]);
  const nbdImage = /^nbds?(\+unix|\+tcp)?:\/\//.test(v.image);
  if (!nbdImage && v["reconnect-delay"] !== undefined) {
    throw new UsageError("--reconnect-delay is an option of nbd images (--image nbd://...)");
  }
  if (nbdImage) {
    if (format === "qcow2") {
      throw new UsageError("--format qcow2 over an NBD image is not supported");
    }
    let uri;
    try {
      uri = parseNbdUri(v.image);
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
    block = {
      driver: "nbd",
      server: uri.server,
      exportName: uri.exportName,
      reconnectDelay: intOption("reconnect-delay", v["reconnect-delay"], 0, 0, 3600),
      format,
      cache,
      aio,
      readOnly,
      discard,
    };
  } else if (nullMatch) {
    const size = parseSize(nullMatch[2]);
    if (size === 0 || size % 512 !== 0) {
      throw new UsageError(`null image size must be a non-zero multiple of 512`);
    }
    block = {
      driver: nullMatch[1] as "null-co" | "null-aio",
      size,
      format,
      cache,
      aio,
      readOnly,
      discard,
    };
  } else if (isRbd) {
    let rbd;
    try {
      rbd = parseRbdFilename(v.image);
    } catch (e) {
      throw new UsageError(`--image: ${(e as Error).message}`);
    }
    const { confOptions, ...where } = rbd;
    block = { driver: "rbd", ...where, format, cache, aio, readOnly, discard };
    if (confOptions) block.rbdConf = confOptions;
  } else {
    block = { driver: "file", filename: v.image, format, cache, aio, readOnly, discard };
    if (l2CacheSize !== undefined) block.l2CacheSize = l2CacheSize;
  }

  const serial = v.serial ?? "dataplane";
  if (new TextEncoder().encode(serial).length > 20) {
    throw new UsageError("--serial is at most 20 bytes");
  }
  const queues = intOption("queues", v.queues, 1, 1, 64);
  const iothreads = intOption("iothreads", v.iothreads, 1, 1, 64);
  // QEMU's VIRTQUEUE_MAX_SIZE by default: front-ends ask for 512-1024 entries.
  const queueSize = intOption(
    "queue-size",
    v["queue-size"],
    DEFAULT_MAX_QUEUE_SIZE,
    1,
    VIRTQUEUE_MAX_SIZE,
  );
  if ((queueSize & (queueSize - 1)) !== 0) {
    throw new UsageError("--queue-size must be a power of two");
  }
  const logicalBlockSize = intOption("logical-block-size", v["logical-block-size"], 512, 512, 4096);
  if (logicalBlockSize !== 512 && logicalBlockSize !== 4096) {
    throw new UsageError("--logical-block-size must be 512 or 4096");
  }
  const pollMaxNs = intOption("poll-max-ns", v["poll-max-ns"], 32768, 0, 1e9);
  const aioMaxBatch = intOption(
    "aio-max-batch",
    v["aio-max-batch"],
    DEFAULT_AIO_MAX_BATCH,
    1,
    1024,
  );
  let socketMode = 0o600;
  if (v["socket-mode"] !== undefined) {
    if (!/^0?[0-7]{3}$/.test(v["socket-mode"])) {
      throw new UsageError(`--socket-mode takes an octal mode such as 0600`);
    }
    socketMode = parseInt(v["socket-mode"], 8);
  }
  let testHoldCompletions: HostOptions["testHoldCompletions"];
  if (v["test-hold-completions"] !== undefined) {
    const m = /^(\d+):(\d+)$/.exec(v["test-hold-completions"]);
    const every = Number(m?.[1]), ms = Number(m?.[2]);
    if (!m || every < 1 || every > 1e6 || ms > 60_000) {
      throw new UsageError("--test-hold-completions takes EVERY:MS (1..1000000, 0..60000)");
    }
    testHoldCompletions = { every, ms };
  }
  let testBreakRing: number | undefined;
  if (v["test-break-ring"] !== undefined) {
    testBreakRing = Number(v["test-break-ring"]);
    if (!/^\d+$/.test(v["test-break-ring"]) || testBreakRing < 1 || testBreakRing > 1e6) {
      throw new UsageError("--test-break-ring takes EVERY (1..1000000)");
    }
  }
  const throttle = v.throttle === undefined ? undefined : parseThrottle(v.throttle);
  return {
    ...(testHoldCompletions ? { testHoldCompletions } : {}),
    ...(testBreakRing ? { testBreakRing } : {}),
    ...(throttle ? { throttle } : {}),
    block,
    socket: v.socket ?? "",
    socketMode,
    serial,
    queues,
    iothreads: Math.min(iothreads, queues),
    logicalBlockSize,
    queueSize,
    pollMaxNs,
    aioMaxBatch,
    help: false,
  };
}

/**
 * Parses `--throttle` LIMITS: comma-separated `NAME=N` with QEMU's
 * ThrottleLimits names (`iops-total`, `bps-read-max`,
 * `iops-write-max-length`, `iops-size`, ...), checked as QEMU's
 * throttle_is_valid.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseThrottle } from "./host_options.ts";
 * const c = parseThrottle("iops-total=500,bps-total=1048576");
 * assert.equal(c.buckets["iops-total"].avg, 500);
 * assert.throws(() => parseThrottle("iops-total-max=5"), /--throttle: bps_max\/iops_max require/);
 * ```
 */
export function parseThrottle(text: string): ThrottleConfig {
  const c = throttleConfigInit();
  for (const item of text.split(",")) {
    const m = /^([a-z-]+)=(\d+)$/.exec(item);
    if (!m) {
      throw new UsageError(`--throttle takes NAME=N,... (such as iops-total=500), not '${item}'`);
    }
    const [, name, value] = m;
    const n = Number(value);
    const bucket = THROTTLE_BUCKETS.find((b) => name.startsWith(b));
    if (name === "iops-size") c.iopsSize = n;
    else if (bucket === name) c.buckets[bucket].avg = n;
    else if (bucket !== undefined && name === `${bucket}-max`) c.buckets[bucket].max = n;
    else if (bucket !== undefined && name === `${bucket}-max-length`) {
      c.buckets[bucket].burstLength = n;
    } else throw new UsageError(`--throttle: unknown limit '${name}'`);
  }
  const err = throttleIsValid(c);
  if (err !== null) throw new UsageError(`--throttle: ${err}`);
  return c;
}

function defaults(): HostOptions {
  return {
    block: {
      driver: "null-co",
      size: 0,
      format: "raw",
      cache: "writeback",
      aio: "threads",
      readOnly: false,
      discard: "unmap",
    },
    socket: "",
    socketMode: 0o600,
    serial: "dataplane",
    queues: 1,
    iothreads: 1,
    logicalBlockSize: 512,
    queueSize: DEFAULT_MAX_QUEUE_SIZE,
    pollMaxNs: 32768,
    aioMaxBatch: DEFAULT_AIO_MAX_BATCH,
    help: false,
  };
}
