import type { MappedRegion } from "../sys/mod.ts";
import type { IoEngine } from "./io_engine.ts";
import type { RequestSerialiser } from "./request_serialiser.ts";

/**
 * What the file driver's pooled request objects (bounce requests, tracked
 * writes) need from the driver that owns them. Internal to block/.
 *
 * @example
 * ```ts
 * import type { FileRequestHost } from "./file_request_host.ts";
 * const alignment = (h: FileRequestHost) => h.requestAlignment;
 * if (typeof alignment !== "function") throw new Error("unreachable");
 * ```
 */
export interface FileRequestHost {
  /** The image's fd. */
  readonly fd: number;
  /** The engine doing the I/O. */
  readonly engine: IoEngine;
  /** O_DIRECT offset/length alignment. */
  readonly requestAlignment: number;
  /** Locks write-like requests against read-modify-writes (null when none can happen). */
  readonly serialiser: RequestSerialiser | null;
  /** An aligned bounce buffer of at least `len` bytes. */
  bounceGet(len: number): MappedRegion;
  /** Returns a bounce buffer. */
  bouncePut(buf: MappedRegion): void;
}
