/**
 * The process's resident memory: figures from /proc/PID/status (VmRSS split
 * into anonymous, file and shared-memory pages) and
 * {@link releaseExecutablePages}, which gives back the pages of the running
 * executable that start-up touched.
 *
 * @module
 */

import { libc } from "./libc.ts";
import { check } from "./sys_error.ts";
import { pointerFrom } from "./pointer.ts";

/** madvise advice: drop the pages; a later access faults them in again (sys/mman.h). */
export const MADV_DONTNEED = 4;

/**
 * madvise(2) over `[addr, addr + length)`; throws {@link SysError}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { madvise, MADV_DONTNEED } from "./resident.ts";
 * import { mmapAnonymous } from "./mman.ts";
 * const m = mmapAnonymous(4096);
 * m.bytes[0] = 7;
 * madvise(m.addr, 4096, MADV_DONTNEED); // an anonymous page reads as zero again
 * assert.equal(m.bytes[0], 0);
 * m.unmap();
 * ```
 */
export function madvise(addr: number, length: number, advice: number): void {
  check("madvise", libc.madvise(pointerFrom(addr), BigInt(length), advice));
}

/** Resident memory of a process in KiB, from /proc/PID/status. */
export interface ResidentMemory {
  /** VmRSS: every page mapped (anonymous, file, shared memory). */
  rssKiB: number;
  /** VmHWM: the largest VmRSS so far. */
  hwmKiB: number;
  /** Anonymous pages (heaps, stacks, V8 pages, private copies). */
  anonKiB: number;
  /** Shared-memory pages (memfd guest memory, SharedArrayBuffers). */
  shmemKiB: number;
  /** File pages mapped (the executable's text and data, libraries). */
  fileKiB: number;
}

function kib(text: string, key: string): number {
  const m = new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(text);
  return m ? Number(m[1]) : 0;
}

/**
 * This process's {@link ResidentMemory} (or another's, by `pid`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { residentMemory } from "./resident.ts";
 * const r = residentMemory();
 * assert.ok(r.rssKiB > 0 && r.anonKiB + r.fileKiB <= r.rssKiB);
 * ```
 */
export function residentMemory(pid: number | "self" = "self"): ResidentMemory {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  return {
    rssKiB: kib(status, "VmRSS"),
    hwmKiB: kib(status, "VmHWM"),
    anonKiB: kib(status, "RssAnon"),
    shmemKiB: kib(status, "RssShmem"),
    fileKiB: kib(status, "RssFile"),
  };
}

/** What {@link releaseExecutablePages} did. */
export interface ReleasedPages {
  /** Mappings advised. */
  mappings: number;
  /** Resident KiB they held before. */
  residentKiB: number;
}

/**
 * Drops this process's page-table entries for the read-only mappings of its
 * own executable (`/proc/self/exe`: text and read-only data) that hold no
 * private page, with MADV_DONTNEED. The pages stay in the page cache; the
 * code that runs afterwards faults its pages back in (minor faults). Deno's
 * binary is ~95 MB, and start-up (snapshot, module loading, compiling) maps
 * some 40 MB of it, most of which serving never touches again.
 *
 * Safe because those pages equal the file: a mapping with any anonymous
 * (copied-on-write) page, such as RELRO data the loader relocated, is
 * skipped, and writable mappings are never touched.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { releaseExecutablePages } from "./resident.ts";
 * const r = releaseExecutablePages();
 * assert.ok(r.mappings >= 1 && r.residentKiB > 0);
 * ```
 */
export function releaseExecutablePages(): ReleasedPages {
  const exe = Deno.readLinkSync("/proc/self/exe");
  const smaps = Deno.readTextFileSync("/proc/self/smaps");
  const out: ReleasedPages = { mappings: 0, residentKiB: 0 };
  for (const entry of smaps.split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/)) {
    const h = /^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+ *(.*)$/m.exec(entry);
    if (!h || h[4] !== exe || (h[3] !== "r-xp" && h[3] !== "r--p")) continue;
    if (kib(entry, "Anonymous") !== 0) continue;
    const start = parseInt(h[1], 16), end = parseInt(h[2], 16);
    out.residentKiB += kib(entry, "Rss");
    madvise(start, end - start, MADV_DONTNEED);
    out.mappings++;
  }
  return out;
}

/**
 * The V8 heap of the calling isolate (Deno.memoryUsage), in bytes.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { isolateHeap } from "./resident.ts";
 * const h = isolateHeap();
 * assert.ok(h.used > 0 && h.used <= h.total);
 * ```
 */
export function isolateHeap(): IsolateHeap {
  const m = Deno.memoryUsage();
  return { used: m.heapUsed, total: m.heapTotal, external: m.external };
}

/** One isolate's V8 heap in bytes: used and reserved (heapTotal), and external (ArrayBuffers). */
export interface IsolateHeap {
  used: number;
  total: number;
  external: number;
}
