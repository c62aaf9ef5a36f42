/**
 * Where a qcow2 image's backing file name points: an absolute name as it
 * is, a relative one against the image's directory (QEMU's
 * bdrv_get_full_backing_filename), made absolute against the working
 * directory and normalised so the chain's loop check compares like with
 * like. Written here rather than with node:path, whose Node compatibility
 * layer costs every isolate that loads qcow2 ~2 MiB.
 *
 * @module
 */

/**
 * The absolute, normalised path of backing file `name` of the image at
 * `imagePath` (as node:path's `resolve(dirname(imagePath), name)`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { backingFilePath } from "./backing_path.ts";
 * assert.equal(backingFilePath("/img/top.qcow2", "base.qcow2"), "/img/base.qcow2");
 * assert.equal(backingFilePath("/img/a/top.qcow2", "../b/./base.raw"), "/img/b/base.raw");
 * assert.equal(backingFilePath("/img/top.qcow2", "/abs//base.qcow2"), "/abs/base.qcow2");
 * assert.equal(backingFilePath("top.qcow2", "base.qcow2"), `${Deno.cwd()}/base.qcow2`);
 * ```
 */
export function backingFilePath(imagePath: string, name: string): string {
  if (name.startsWith("/")) return normalize(name);
  const slash = imagePath.lastIndexOf("/");
  const dir = slash < 0 ? "." : imagePath.slice(0, slash + 1);
  const base = dir.startsWith("/") ? dir : `${Deno.cwd()}/${dir}`;
  return normalize(`${base}/${name}`);
}

/** An absolute path without `.`, `..`, empty or trailing components. */
function normalize(path: string): string {
  const out: string[] = [];
  for (const part of path.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") out.pop();
    else out.push(part);
  }
  return `/${out.join("/")}`;
}
