/**
 * Finds the Debian kernel that tools/setup.sh unpacks into `.cache/kernel/` and
 * resolves kernel modules with their dependencies. The .deb ships no
 * modules.dep (depmod runs in its postinst), so dependencies are read from each
 * module's own `.modinfo` section (`depends=a,b`).
 *
 * @module
 */

import { join } from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root (two levels above this file). */
export const REPO_ROOT: string = fileURLToPath(new URL("../..", import.meta.url)).replace(
  /\/$/,
  "",
);

/** Where tools/setup.sh unpacks the kernel package. */
export const KERNEL_DIR: string = join(REPO_ROOT, ".cache", "kernel");

/** A kernel image and its module tree. */
export interface KernelImage {
  /** Path of `boot/vmlinuz-<release>`. */
  vmlinuz: string;
  /** The release string, e.g. "6.1.0-56-amd64". */
  release: string;
  /** Path of `lib/modules/<release>`. */
  modulesDir: string;
}

/** A resolved kernel module file. */
export interface KernelModule {
  /** Module name with "-" normalised to "_" (e.g. "virtio_blk"). */
  name: string;
  /** Path of the `.ko` file. */
  path: string;
  /** Names of the modules it depends on. */
  depends: string[];
}

/**
 * Returns the kernel under `dir` (default `.cache/kernel`), or throws an Error
 * that says to run `tools/setup.sh --test`.
 *
 * @example
 * ```ts ignore
 * import { findKernel } from "./kernel_image.ts";
 * const k = findKernel();
 * console.log(k.release, k.vmlinuz);
 * ```
 */
export function findKernel(dir: string = KERNEL_DIR): KernelImage {
  let entries: string[] = [];
  try {
    entries = [...Deno.readDirSync(join(dir, "boot"))].map((e) => e.name);
  } catch { /* handled below */ }
  const images = entries.filter((n) => n.startsWith("vmlinuz-")).sort();
  if (images.length === 0) {
    throw new Error(`no kernel image in ${dir}/boot: run tools/setup.sh --test`);
  }
  const name = images[images.length - 1];
  const release = name.slice("vmlinuz-".length);
  return {
    vmlinuz: join(dir, "boot", name),
    release,
    modulesDir: join(dir, "lib", "modules", release),
  };
}

/**
 * Reads the `depends=` field of a module's `.modinfo` section. The section is
 * a run of NUL-terminated `key=value` strings, so a byte search for the key at
 * a string boundary finds it without parsing ELF.
 *
 * @example
 * ```ts
 * import { moduleDepends } from "./kernel_image.ts";
 * const ko = new TextEncoder().encode("\0license=GPL\0depends=virtio,virtio_ring\0name=x\0");
 * const deps = moduleDepends(ko);
 * if (deps.join() !== "virtio,virtio_ring") throw new Error(deps.join());
 * ```
 */
export function moduleDepends(ko: Uint8Array): string[] {
  const key = new TextEncoder().encode("\0depends=");
  outer: for (let i = 0; i + key.length <= ko.length; i++) {
    for (let j = 0; j < key.length; j++) {
      if (ko[i + j] !== key[j]) continue outer;
    }
    let end = i + key.length;
    while (end < ko.length && ko[end] !== 0) end++;
    const value = new TextDecoder().decode(ko.subarray(i + key.length, end));
    return value === "" ? [] : value.split(",").map((n) => n.replaceAll("-", "_"));
  }
  return [];
}

function indexModules(modulesDir: string): Map<string, string> {
  const index = new Map<string, string>();
  const walk = (dir: string) => {
    for (const e of Deno.readDirSync(dir)) {
      const p = join(dir, e.name);
      if (e.isDirectory) walk(p);
      else if (e.isFile && e.name.endsWith(".ko")) {
        index.set(e.name.slice(0, -3).replaceAll("-", "_"), p);
      } else if (e.isFile && /\.ko\.(xz|zst|gz)$/.test(e.name)) {
        const name = e.name.replace(/\.ko\.(xz|zst|gz)$/, "").replaceAll("-", "_");
        if (!index.has(name)) index.set(name, p);
      }
    }
  };
  walk(join(modulesDir, "kernel"));
  return index;
}

/**
 * Resolves `names` and everything they depend on, in an order that `insmod`
 * can load them (dependencies first). Modules built into the kernel
 * (`modules.builtin`) are skipped. Compressed modules (`.ko.xz` etc.) are
 * rejected: the Debian bookworm kernel ships them uncompressed
 * (CONFIG_MODULE_COMPRESS_NONE).
 *
 * @example
 * ```ts ignore
 * import { findKernel, resolveModules } from "./kernel_image.ts";
 * const mods = resolveModules(findKernel(), ["virtio_pci", "virtio_blk"]);
 * console.log(mods.map((m) => m.name)); // virtio_ring, virtio, ..., virtio_blk
 * ```
 */
export function resolveModules(kernel: KernelImage, names: readonly string[]): KernelModule[] {
  const index = indexModules(kernel.modulesDir);
  let builtin = new Set<string>();
  try {
    builtin = new Set(
      Deno.readTextFileSync(join(kernel.modulesDir, "modules.builtin")).split("\n")
        .map((l) => l.split("/").pop()!.replace(/\.ko$/, "").replaceAll("-", "_")),
    );
  } catch { /* no list: assume nothing is built in */ }
  const order: KernelModule[] = [];
  const state = new Map<string, "visiting" | "done">();
  const visit = (raw: string) => {
    const name = raw.replaceAll("-", "_");
    if (state.get(name) === "done") return;
    if (state.get(name) === "visiting") throw new Error(`module dependency cycle at ${name}`);
    const path = index.get(name);
    if (path === undefined) {
      if (builtin.has(name)) {
        state.set(name, "done");
        return;
      }
      throw new Error(`kernel module ${name} not found under ${kernel.modulesDir}`);
    }
    if (!path.endsWith(".ko")) {
      throw new Error(`kernel module ${path} is compressed; only plain .ko is supported`);
    }
    state.set(name, "visiting");
    const depends = moduleDepends(Deno.readFileSync(path));
    for (const d of depends) visit(d);
    state.set(name, "done");
    order.push({ name, path, depends });
  };
  for (const n of names) visit(n);
  return order;
}
