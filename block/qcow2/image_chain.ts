import type { AioContext } from "../../aio/mod.ts";
import type { BlockDriver } from "../block_driver.ts";
import { RawDriver } from "../raw_driver.ts";
import { QCOW2_MAX_BACKING_DEPTH } from "./constants.ts";
import { Qcow2Driver } from "./qcow2_driver.ts";
import { Qcow2Error } from "./qcow2_error.ts";
import { backingFilePath } from "./backing_path.ts";

/**
 * How {@link openQcow2Image} opens files: `openFile(path, readOnly)` returns
 * a protocol driver for it (the caller's cache and aio choices).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { Qcow2ImageOptions } from "./image_chain.ts";
 * const o: Partial<Qcow2ImageOptions> = { readOnly: true };
 * assert(o.readOnly);
 * ```
 */
export interface Qcow2ImageOptions {
  /** Opens a file as a protocol driver. */
  openFile: (path: string, readOnly: boolean) => BlockDriver;
  /** The top image's mode (backing files are always read-only). */
  readOnly: boolean;
  /** QEMU's l2-cache-size, for every qcow2 image of the chain. */
  l2CacheSize?: number;
  /** The top image's {@link Qcow2SharedState} memory (several writing IOThreads). */
  shared?: SharedArrayBuffer;
}

/**
 * Opens `filename` as qcow2 with its whole backing chain (QEMU's
 * bdrv_open_backing_file, without format probing): each backing file is
 * opened read-only with the format its overlay records (raw or qcow2), a
 * relative name taken relative to the overlay's directory. A chain that
 * comes back to a file already in it, or is deeper than
 * {@link QCOW2_MAX_BACKING_DEPTH}, or names a file that cannot be opened,
 * throws {@link Qcow2Error} (kind `BackingChain`); everything opened so far
 * is closed again. The context must be polled meanwhile.
 *
 * @example
 * ```ts ignore
 * const top = await openQcow2Image(ctx, "disk.qcow2", {
 *   readOnly: true,
 *   openFile: (path, ro) => FileDriver.open(ctx, { filename: path, readOnly: ro }),
 * });
 * ```
 */
export function openQcow2Image(
  ctx: AioContext,
  filename: string,
  opts: Qcow2ImageOptions,
): Promise<BlockDriver> {
  return openLayer(ctx, filename, "qcow2", opts.readOnly, opts, new Set(), 0);
}

async function openLayer(
  ctx: AioContext,
  filename: string,
  format: string,
  readOnly: boolean,
  opts: Qcow2ImageOptions,
  seen: Set<string>,
  depth: number,
): Promise<BlockDriver> {
  if (depth > QCOW2_MAX_BACKING_DEPTH) {
    throw new Qcow2Error(
      "BackingChain",
      `backing chain deeper than ${QCOW2_MAX_BACKING_DEPTH} images at ${filename}`,
    );
  }
  let real: string;
  try {
    real = Deno.realPathSync(filename);
  } catch (e) {
    throw new Qcow2Error("BackingChain", `cannot open ${filename}: ${(e as Error).message}`);
  }
  if (seen.has(real)) {
    throw new Qcow2Error("BackingChain", `backing chain loops: ${filename} is already in it`);
  }
  seen.add(real);
  let file: BlockDriver;
  try {
    file = opts.openFile(filename, readOnly);
  } catch (e) {
    if (depth === 0) throw e;
    throw new Qcow2Error("BackingChain", `cannot open ${filename}: ${(e as Error).message}`);
  }
  try {
    if (format === "raw") return new RawDriver(file);
    return await Qcow2Driver.open(ctx, file, {
      readOnly,
      l2CacheSize: opts.l2CacheSize,
      shared: depth === 0 ? opts.shared : undefined,
      openBacking: (name, fmt) => {
        if (name.startsWith("json:")) {
          throw new Qcow2Error("Unsupported", `backing file name ${name} (json: filenames)`);
        }
        const path = backingFilePath(filename, name);
        return openLayer(ctx, path, fmt, true, opts, seen, depth + 1);
      },
    });
  } catch (e) {
    await file.close();
    throw e;
  }
}
