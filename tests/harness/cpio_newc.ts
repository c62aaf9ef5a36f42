/**
 * A writer for the "newc" (SVR4, magic `070701`) cpio format, the format the
 * Linux kernel unpacks as an initramfs (Documentation/driver-api/early-userspace/
 * buffer-format.rst). Small on purpose: regular files, directories, symlinks and
 * device nodes, no hard links.
 *
 * @module
 */

/** File type bits of `st_mode` (sys/stat.h). */
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

/** One archive member. `path` is relative to the archive root, without a leading "/". */
export type CpioEntry =
  | { kind: "dir"; path: string; mode?: number }
  | { kind: "file"; path: string; data: Uint8Array; mode?: number }
  | { kind: "symlink"; path: string; target: string }
  | { kind: "chardev"; path: string; major: number; minor: number; mode?: number };

/** The fixed newc header is 6 bytes of magic plus 13 fields of 8 hex digits. */
const HEADER_SIZE = 110;
const TRAILER = "TRAILER!!!";

function hex8(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) {
    throw new RangeError(`cpio newc: field ${n} does not fit in 32 bits`);
  }
  return n.toString(16).padStart(8, "0");
}

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

/**
 * Encodes `entries` (in order) as a newc cpio archive, ending with the
 * `TRAILER!!!` member. Parent directories must be listed before their children,
 * as the kernel creates members in archive order. All members are owned by root
 * and have mtime 0, so the same entries always give the same bytes.
 *
 * @example
 * ```ts
 * import { writeCpioNewc } from "./cpio_newc.ts";
 * const bytes = writeCpioNewc([
 *   { kind: "dir", path: "bin" },
 *   { kind: "file", path: "bin/hello", data: new TextEncoder().encode("hi\n"), mode: 0o755 },
 * ]);
 * if (new TextDecoder().decode(bytes.subarray(0, 6)) !== "070701") throw new Error("magic");
 * if (bytes.length % 4 !== 0) throw new Error("newc members are 4-byte aligned");
 * ```
 */
export function writeCpioNewc(entries: readonly CpioEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const chunks: Uint8Array[] = [];
  let total = 0;
  const push = (b: Uint8Array) => {
    chunks.push(b);
    total += b.length;
  };
  const member = (
    ino: number,
    mode: number,
    data: Uint8Array,
    name: string,
    rdev: [number, number] = [0, 0],
    nlink = 1,
  ) => {
    const nameBytes = enc.encode(name);
    const namesize = nameBytes.length + 1; // with the terminating NUL
    const header = "070701" + [
      ino,
      mode,
      0, // uid
      0, // gid
      nlink,
      0, // mtime
      data.length,
      0, // devmajor
      0, // devminor
      rdev[0],
      rdev[1],
      namesize,
      0, // check (only used by the "crc" variant 070702)
    ].map(hex8).join("");
    push(enc.encode(header));
    push(nameBytes);
    push(new Uint8Array(1 + pad4(HEADER_SIZE + namesize))); // NUL, then align to 4
    push(data);
    push(new Uint8Array(pad4(data.length)));
  };
  let ino = 1;
  for (const e of entries) {
    const path = e.path.replace(/^\/+/, "");
    if (path === "" || path.split("/").includes("..")) {
      throw new RangeError(`cpio newc: bad member path ${JSON.stringify(e.path)}`);
    }
    switch (e.kind) {
      case "dir":
        member(ino++, S_IFDIR | (e.mode ?? 0o755), new Uint8Array(0), path, [0, 0], 2);
        break;
      case "file":
        member(ino++, S_IFREG | (e.mode ?? 0o644), e.data, path);
        break;
      case "symlink":
        member(ino++, S_IFLNK | 0o777, enc.encode(e.target), path);
        break;
      case "chardev":
        member(ino++, S_IFCHR | (e.mode ?? 0o600), new Uint8Array(0), path, [e.major, e.minor]);
        break;
    }
  }
  member(0, 0, new Uint8Array(0), TRAILER, [0, 0], 1);
  const out = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}
