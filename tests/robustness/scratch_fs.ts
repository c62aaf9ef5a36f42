/**
 * Small real file systems for error-path tests: the kernel itself produces
 * the errors, so the tests exercise what a disk would do rather than what a
 * fake engine was told to return. A size-limited tmpfs fills up (ENOSPC) and
 * has no FALLOC_FL_ZERO_RANGE (EOPNOTSUPP); ramfs has no fallocate at all; a
 * loop-mounted ext4 can be shut down (EXT4_IOC_SHUTDOWN through `xfs_io -x -c
 * shutdown`), after which every read, write and sync on an open file fails
 * with EIO. The device mapper `error` target would be the classic EIO source,
 * but this kernel has no device mapper (no `device-mapper` in /proc/devices),
 * so the shut-down file system stands in for it.
 *
 * Needs root; {@link scratchFsUnavailable} says why a kind cannot be used.
 *
 * @module
 */

import { makeScratchDir } from "../harness/mod.ts";

/** Which file system. */
export type ScratchFsKind = "tmpfs" | "ramfs" | "ext4";

/** A mounted scratch file system holding one sparse image. */
export interface ScratchFs {
  dir: string;
  /** The mount point. */
  mnt: string;
  image: string;
  socket: string;
  /** ext4 only: shuts the file system down (every later I/O fails with EIO). */
  shutdown(): void;
  /** Unmounts and removes everything. */
  remove(): void;
}

function run(cmd: string, ...args: string[]): { ok: boolean; err: string } {
  try {
    const o = new Deno.Command(cmd, { args, stdout: "null", stderr: "piped" }).outputSync();
    return { ok: o.success, err: new TextDecoder().decode(o.stderr).trim() };
  } catch (e) {
    return { ok: false, err: `${cmd}: ${(e as Error).message}` };
  }
}

/** Why `kind` cannot be mounted here, or null. */
export function scratchFsUnavailable(kind: ScratchFsKind): string | null {
  if (Deno.uid() !== 0) return `mounting ${kind} needs root`;
  const fss = Deno.readTextFileSync("/proc/filesystems");
  if (!new RegExp(`\\s${kind}\\n`).test(fss)) return `the kernel has no ${kind}`;
  if (kind === "ext4") {
    for (const tool of ["mkfs.ext4", "xfs_io", "losetup"]) {
      if (!run("sh", "-c", `command -v ${tool}`).ok) {
        return `${tool} missing (tools/setup.sh --test installs it)`;
      }
    }
    if (!run("sh", "-c", "test -e /dev/loop-control").ok) return "no loop devices";
  }
  return null;
}

/**
 * Mounts a `kind` file system of `fsBytes` (tmpfs, ext4; ramfs has no limit)
 * and creates a sparse image of `imageBytes` in it.
 */
export async function mountScratchFs(
  kind: ScratchFsKind,
  fsBytes: number,
  imageBytes: number,
): Promise<ScratchFs> {
  const dir = await makeScratchDir(`errfs-${kind}`);
  const mnt = `${dir}/mnt`;
  Deno.mkdirSync(mnt);
  let r;
  if (kind === "ext4") {
    const backing = `${dir}/fs.img`;
    Deno.writeFileSync(backing, new Uint8Array());
    Deno.truncateSync(backing, fsBytes);
    r = run("mkfs.ext4", "-q", "-F", backing);
    if (r.ok) r = run("mount", "-o", "loop", backing, mnt);
  } else {
    const opts = kind === "tmpfs" ? ["-o", `size=${fsBytes}`] : [];
    r = run("mount", "-t", kind, ...opts, kind, mnt);
  }
  if (!r.ok) {
    Deno.removeSync(dir, { recursive: true });
    throw new Error(`mounting ${kind}: ${r.err}`);
  }
  const image = `${mnt}/disk.raw`;
  Deno.writeFileSync(image, new Uint8Array());
  Deno.truncateSync(image, imageBytes);
  let mounted = true;
  return {
    dir,
    mnt,
    image,
    socket: `${dir}/blk.sock`,
    shutdown: () => {
      const s = run("xfs_io", "-x", "-c", "shutdown -f", mnt);
      if (!s.ok) throw new Error(`xfs_io shutdown: ${s.err}`);
    },
    remove: () => {
      // Lazily if need be: a killed host may hold the image open for a moment.
      if (mounted && !run("umount", mnt).ok) run("umount", "-l", mnt);
      mounted = false;
      Deno.removeSync(dir, { recursive: true });
    },
  };
}
