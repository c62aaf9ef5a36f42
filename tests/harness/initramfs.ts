/**
 * Builds a tiny Linux initramfs for end-to-end tests: busybox-static, the
 * kernel's virtio modules, and an `/init` that mounts /proc, /sys and /dev,
 * loads the modules, runs the test's shell script (`/test.sh`), prints
 * `E2E-EXIT <status>` and powers the guest off. Archives are cached under
 * `.cache/initramfs/`, keyed by a hash of every input; the 8 most recently
 * used are kept.
 *
 * @module
 */

import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { type CpioEntry, writeCpioNewc } from "./cpio_newc.ts";
import { findKernel, type KernelImage, REPO_ROOT, resolveModules } from "./kernel_image.ts";

/** Modules a guest needs for a virtio-blk PCI disk (dependencies are added automatically). */
export const VIRTIO_BLK_MODULES: readonly string[] = ["virtio_pci", "virtio_blk"];

/** An extra file placed in the initramfs. */
export interface InitramfsFile {
  /** Absolute guest path, e.g. "/pattern.bin". */
  path: string;
  data: Uint8Array;
  mode?: number;
}

/** What goes into an initramfs. */
export interface InitramfsOptions {
  /** Shell script (busybox ash) that /init runs as /test.sh once modules are loaded. */
  script: string;
  /** Kernel modules to load (with dependencies); default {@link VIRTIO_BLK_MODULES}. */
  modules?: readonly string[];
  /** Extra files (e.g. test patterns). */
  files?: readonly InitramfsFile[];
  /** Kernel whose modules are used; default {@link findKernel}(). */
  kernel?: KernelImage;
  /** busybox-static binary; default /usr/bin/busybox or /bin/busybox. */
  busybox?: string;
  /** Cache directory; default `.cache/initramfs` in the repository. */
  cacheDir?: string;
}

/** Bumped whenever the layout or /init changes, so old cache entries are not reused. */
const FORMAT_VERSION = 1;

function findBusybox(): string {
  for (const p of ["/usr/bin/busybox", "/bin/busybox"]) {
    try {
      if (Deno.statSync(p).isFile) return p;
    } catch { /* next */ }
  }
  throw new Error("busybox not found: run tools/setup.sh --test (busybox-static)");
}

/**
 * The `/init` script: sets up the guest, loads `moduleNames` in order, runs
 * /test.sh and powers off. A failed insmod prints `E2E-FAIL insmod-<name>`.
 *
 * @example
 * ```ts
 * import { initScript } from "./initramfs.ts";
 * const init = initScript(["virtio_ring", "virtio"]);
 * if (!init.startsWith("#!/bin/sh\n") || !init.includes("insmod /lib/modules/virtio.ko")) {
 *   throw new Error(init);
 * }
 * ```
 */
export function initScript(moduleNames: readonly string[]): string {
  const insmods = moduleNames.map((m) =>
    `insmod /lib/modules/${m}.ko || echo "E2E-FAIL insmod-${m}"`
  ).join("\n");
  return `#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo "E2E-BOOT $(cut -d' ' -f1 /proc/uptime)"
${insmods}
sh /test.sh
echo "E2E-EXIT $?"
sync
poweroff -f
`;
}

async function sha256Hex(parts: readonly Uint8Array[]): Promise<string> {
  let len = 0;
  for (const p of parts) len += p.length + 8;
  const all = new Uint8Array(len);
  const dv = new DataView(all.buffer);
  let off = 0;
  for (const p of parts) {
    dv.setBigUint64(off, BigInt(p.length), true); // length-prefixed: no ambiguity
    all.set(p, off + 8);
    off += p.length + 8;
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", all));
  return [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Builds (or reuses from the cache) a gzip'd newc initramfs and returns its
 * path. The cache key covers the script, the extra files, busybox and every
 * module's bytes, so changing any input gives a new archive.
 *
 * @example
 * ```ts ignore
 * import { buildInitramfs } from "./initramfs.ts";
 * const initrd = await buildInitramfs({ script: "echo hello from the guest\n" });
 * ```
 */
export async function buildInitramfs(opts: InitramfsOptions): Promise<string> {
  const kernel = opts.kernel ?? findKernel();
  const modules = resolveModules(kernel, opts.modules ?? VIRTIO_BLK_MODULES);
  const busyboxPath = opts.busybox ?? findBusybox();
  const cacheDir = opts.cacheDir ?? join(REPO_ROOT, ".cache", "initramfs");
  const enc = new TextEncoder();

  const busybox = await Deno.readFile(busyboxPath);
  const init = initScript(modules.map((m) => m.name));
  const moduleBytes = await Promise.all(modules.map((m) => Deno.readFile(m.path)));
  const files = opts.files ?? [];
  const key = await sha256Hex([
    enc.encode(`initramfs v${FORMAT_VERSION} ${kernel.release}`),
    enc.encode(init),
    enc.encode(opts.script),
    busybox,
    ...modules.map((m) => enc.encode(m.name)),
    ...moduleBytes,
    ...files.flatMap((f) => [enc.encode(`${f.path} ${f.mode ?? 0o644}`), f.data]),
  ]);
  const out = join(cacheDir, `${key.slice(0, 24)}.cpio.gz`);
  try {
    if ((await Deno.stat(out)).size > 0) {
      const now = new Date();
      await Deno.utime(out, now, now); // most recently used: pruned last
      return out;
    }
  } catch { /* build it */ }

  const entries: CpioEntry[] = [
    ...["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"].map((path) => ({
      kind: "dir" as const,
      path,
    })),
    { kind: "chardev", path: "dev/console", major: 5, minor: 1 },
    { kind: "chardev", path: "dev/null", major: 1, minor: 3, mode: 0o666 },
    { kind: "file", path: "bin/busybox", data: busybox, mode: 0o755 },
    { kind: "symlink", path: "bin/sh", target: "busybox" },
    { kind: "file", path: "init", data: enc.encode(init), mode: 0o755 },
    { kind: "file", path: "test.sh", data: enc.encode(opts.script), mode: 0o755 },
    ...modules.map((m, i) => ({
      kind: "file" as const,
      path: `lib/modules/${m.name}.ko`,
      data: moduleBytes[i],
    })),
  ];
  const dirs = new Set(entries.filter((e) => e.kind === "dir").map((e) => e.path));
  for (const f of files) {
    const path = f.path.replace(/^\/+/, "");
    const parts = path.split("/");
    for (let i = 1; i < parts.length; i++) {
      const d = parts.slice(0, i).join("/");
      if (!dirs.has(d)) {
        dirs.add(d);
        entries.push({ kind: "dir", path: d });
      }
    }
    entries.push({ kind: "file", path, data: f.data, mode: f.mode });
  }
  const gz = gzipSync(writeCpioNewc(entries), { level: 6 });
  await Deno.mkdir(cacheDir, { recursive: true });
  const tmp = `${out}.${Deno.pid}.tmp`;
  await Deno.writeFile(tmp, gz);
  await Deno.rename(tmp, out); // atomic: concurrent builders never see a partial file
  await pruneCache(cacheDir, CACHE_KEEP);
  return out;
}

/** How many archives the cache keeps (each ~5 MB). */
const CACHE_KEEP = 8;

async function pruneCache(dir: string, keep: number): Promise<void> {
  const entries: { path: string; mtime: number }[] = [];
  for await (const e of Deno.readDir(dir)) {
    if (!e.isFile || !e.name.endsWith(".cpio.gz")) continue;
    const path = join(dir, e.name);
    try {
      entries.push({ path, mtime: (await Deno.stat(path)).mtime?.getTime() ?? 0 });
    } catch { /* removed meanwhile */ }
  }
  entries.sort((a, b) => b.mtime - a.mtime);
  for (const e of entries.slice(keep)) {
    try {
      await Deno.remove(e.path);
    } catch { /* removed meanwhile */ }
  }
}
