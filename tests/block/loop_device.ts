/**
 * Test helper: a 4 KiB-sector loop block device (`losetup -b 4096
 * --direct-io=on`) over a scratch file, so O_DIRECT requests are 4 KiB
 * aligned while the guest's logical block stays 512 bytes: the only way to
 * reach the read-modify-write path on a filesystem whose O_DIRECT alignment
 * is 512. The device is always detached (losetup -d), also when the test
 * body throws.
 */
import { close, O_RDONLY, open } from "../../sys/mod.ts";
import { directDir } from "./helpers.ts";

/** Why loop devices cannot be used here, or null when they can. */
export function loopUnavailable(): string | null {
  if (Deno.uid() !== 0) return "not root: losetup needs CAP_SYS_ADMIN";
  try {
    Deno.statSync("/dev/loop-control");
  } catch {
    return "no /dev/loop-control (loop driver missing)";
  }
  try {
    const out = new Deno.Command("losetup", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync();
    if (!out.success) return "losetup --version failed";
  } catch (e) {
    return `losetup not runnable: ${e instanceof Error ? e.message : String(e)}`;
  }
  return null;
}

/** Says loudly that a loop-device test is skipped, and why; returns whether it is. */
export function skipWithoutLoop(name: string): boolean {
  const why = loopUnavailable();
  if (why !== null) console.warn(`SKIPPED ${name}: ${why}`);
  return why !== null;
}

function losetup(args: string[]): string {
  const out = new Deno.Command("losetup", { args, stdout: "piped", stderr: "piped" })
    .outputSync();
  const text = new TextDecoder();
  if (!out.success) {
    throw new Error(`losetup ${args.join(" ")}: ${text.decode(out.stderr).trim()}`);
  }
  return text.decode(out.stdout).trim();
}

/**
 * Runs `fn(device)` on a fresh loop device of `size` bytes with 4 KiB
 * sectors and direct I/O to its backing file. The device is detached at
 * once (`losetup -d` while this process holds it open sets autoclear), so
 * the kernel removes it when its last opener closes: at the end of this
 * call, or when the process dies, even from a crash. The backing file is
 * removed afterwards, whatever `fn` does.
 */
export async function withLoopDevice<T>(
  size: number,
  fn: (device: string) => Promise<T>,
): Promise<T> {
  const backing = `${directDir()}/loop-${crypto.randomUUID()}.img`;
  Deno.writeFileSync(backing, new Uint8Array(0));
  Deno.truncateSync(backing, size);
  let holder = -1;
  try {
    const device = losetup(["-f", "--show", "-b", "4096", "--direct-io=on", backing]);
    try {
      holder = open(device, O_RDONLY);
    } finally {
      losetup(["-d", device]);
    }
    return await fn(device);
  } finally {
    if (holder >= 0) close(holder);
    Deno.removeSync(backing);
  }
}
