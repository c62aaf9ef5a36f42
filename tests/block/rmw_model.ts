/**
 * The oracle of the concurrent write fuzz: what a block device may contain
 * after a round of concurrent requests, byte by byte.
 *
 * A round is a set of requests that may run in any order and overlap in
 * time; every request of a round completes before the next round starts.
 * Each write op `id` writes `opByte(id, x)` at image offset `x`, so any byte
 * tells which write it came from. After a round, a byte covered by writes
 * or write-zeroes must hold the value of one of them (a completed write is
 * never lost, only overwritten by a concurrent one); a byte covered only by
 * a discard may hold anything; an uncovered byte keeps its value. A read
 * may see, for each byte, the value before the round or that of any write
 * of the round covering it. The model then adopts what the device holds.
 */

/** One request of a round. Offsets and lengths in bytes. */
export interface RmwOp {
  kind: "write" | "zeroes" | "discard" | "read";
  offset: number;
  len: number;
  /** Unique over the whole test: the data a write carries. */
  id: number;
  /** write-zeroes may unmap. */
  unmap?: boolean;
  /** Misalign the write's or read's buffer by this many bytes (bounce path). */
  misalign?: number;
}

/** What an IOThread returns for its ops: completion codes and read data (base64). */
export interface RmwResult {
  rets: number[];
  reads: (string | null)[];
}

/** The byte write op `id` puts at image offset `x`. */
export function opByte(id: number, x: number): number {
  return (Math.imul(id + 1, 0x9e3779b1) ^ Math.imul(x + 7, 0x85ebca6b) ^ (x >>> 9)) >>> 24;
}

/** Base64 of bytes (fixture -> test over JSON). */
export function toBase64(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) {
    s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

/** Bytes of base64. */
export function fromBase64(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** The in-memory image and the per-round check. */
export class ByteModel {
  readonly bytes: Uint8Array;

  constructor(initial: Uint8Array) {
    this.bytes = initial.slice();
  }

  /**
   * Checks one completed round: every op's completion code, every read
   * against the state before the round, and `device` (the whole image read
   * after the round) against the rules above; then adopts `device`.
   * Returns a description of the first violation, or null.
   */
  round(
    ops: RmwOp[],
    rets: number[],
    reads: (Uint8Array | null)[],
    device: Uint8Array,
  ): string | null {
    for (let i = 0; i < ops.length; i++) {
      if (rets[i] !== 0) return `op ${describe(ops[i])} failed with ${rets[i]}`;
    }
    const n = this.bytes.length;
    // Per byte: the writes covering it and whether a discard does.
    const writers: number[][] = Array.from({ length: n }, () => []);
    const discarded = new Uint8Array(n);
    for (let i = 0; i < ops.length; i++) {
      const o = ops[i];
      if (o.kind === "read") continue;
      for (let x = o.offset; x < o.offset + o.len; x++) {
        if (o.kind === "discard") discarded[x] = 1;
        else writers[x].push(i);
      }
    }
    const value = (i: number, x: number) => ops[i].kind === "zeroes" ? 0 : opByte(ops[i].id, x);
    const allowed = (x: number, v: number, before: boolean): boolean => {
      if (discarded[x]) return true;
      if (before && v === this.bytes[x]) return true;
      if (writers[x].length === 0) return v === this.bytes[x];
      return writers[x].some((i) => value(i, x) === v);
    };
    for (let i = 0; i < ops.length; i++) {
      const o = ops[i], data = reads[i];
      if (o.kind !== "read" || data === null) continue;
      for (let k = 0; k < o.len; k++) {
        const x = o.offset + k;
        if (!allowed(x, data[k], true)) {
          return `read ${describe(o)} saw ${data[k]} at ${x}: before ${this.bytes[x]}, ` +
            `writers ${writers[x].map((w) => describe(ops[w])).join(", ") || "none"}`;
        }
      }
    }
    for (let x = 0; x < n; x++) {
      if (!allowed(x, device[x], false)) {
        const w = writers[x].map((i) => `${describe(ops[i])}=${value(i, x)}`).join(", ");
        return `after the round byte ${x} (sector ${x >> 9}, block ${x >> 12}) is ${device[x]}: ` +
          `before ${this.bytes[x]}, writers ${w || "none"}`;
      }
    }
    this.bytes.set(device);
    return null;
  }
}

function describe(o: RmwOp): string {
  return `${o.kind}#${o.id}[${o.offset}+${o.len}${o.misalign ? ` mis${o.misalign}` : ""}]`;
}
