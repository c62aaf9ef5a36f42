/**
 * Why a qcow2 image cannot be opened:
 * - `BadMagic`: not a qcow2 image at all;
 * - `Unsupported`: a valid image using something this driver does not do
 *   (version, encryption, external data file, an unknown incompatible
 *   feature, a backing format other than raw/qcow2);
 * - `Invalid`: a header or table that breaks the format's rules (bad
 *   alignment, sizes out of bounds, tables past the end of the file);
 * - `BackingChain`: the backing chain loops, is too deep, or a backing file
 *   cannot be opened;
 * - `Io`: reading the image's metadata failed.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Qcow2Error } from "./qcow2_error.ts";
 * const e = new Qcow2Error("Invalid", "cluster_bits 30 is out of range");
 * assert.equal(e.kind, "Invalid");
 * assert.match(e.message, /^qcow2: cluster_bits/);
 * ```
 */
export class Qcow2Error extends Error {
  /** The class of problem (see the class comment). */
  readonly kind: Qcow2ErrorKind;

  constructor(kind: Qcow2ErrorKind, message: string) {
    super(`qcow2: ${message}`);
    this.name = "Qcow2Error";
    this.kind = kind;
  }
}

/** See {@link Qcow2Error}. */
export type Qcow2ErrorKind = "BadMagic" | "Unsupported" | "Invalid" | "BackingChain" | "Io";
