/**
 * Guest images: a flat binary loaded at 1 MiB and entered at its first byte
 * (what tests/vm/guest/guest.ld lays out), read from a file or built from
 * freestanding 32-bit C with the system's gcc (gcc-multilib).
 *
 * @module
 */

/** The test guest's sources (tests/vm/guest), built by default by `deno task vm`. */
export const DEFAULT_GUEST_DIR = new URL("../tests/vm/guest/", import.meta.url);

/** The default guest's sources in {@link DEFAULT_GUEST_DIR}: runtime, driver, workload. */
export const DEFAULT_GUEST_SOURCES = ["runtime.c", "virtio_blk.c", "workload.c"];

/** A guest build that failed: the compiler's output is the message. */
export class GuestBuildError extends Error {
  readonly kind = "GuestBuild";
  constructor(message: string) {
    super(message);
    this.name = "GuestBuildError";
  }
}

/** gcc flags of a freestanding guest: no libc, no PIC, no SSE, static, flat. */
export const GUEST_CFLAGS = [
  "-m32",
  "-march=i686",
  "-ffreestanding",
  "-nostdlib",
  "-fno-pic",
  "-fno-pie",
  "-no-pie",
  "-O2",
  "-fno-stack-protector",
  "-mgeneral-regs-only",
  "-fno-asynchronous-unwind-tables",
  "-Wall",
  "-Werror",
  "-static",
  "-Wl,--build-id=none",
  "-Wl,--no-warn-rwx-segments",
];

/**
 * Compiles `sources` (file names in `dir`, which holds guest.ld) into a flat
 * image and returns its bytes. Throws {@link GuestBuildError} with gcc's or
 * objcopy's output.
 *
 * @example
 * ```ts ignore
 * const image = await buildGuest(DEFAULT_GUEST_DIR, DEFAULT_GUEST_SOURCES);
 * ```
 */
export async function buildGuest(dir: URL, sources: string[]): Promise<Uint8Array> {
  const tmp = await Deno.makeTempDir({ prefix: "vm-guest-" });
  try {
    const elf = `${tmp}/guest.elf`, bin = `${tmp}/guest.bin`;
    const src = (f: string) => new URL(f, dir).pathname;
    const cc = await new Deno.Command("gcc", {
      // libgcc last: 64-bit division on a 32-bit target.
      args: [...GUEST_CFLAGS, "-T", src("guest.ld"), "-o", elf, ...sources.map(src), "-lgcc"],
      stderr: "piped",
      stdout: "piped",
    }).output().catch((e) => {
      throw new GuestBuildError(`cannot run gcc: ${(e as Error).message}`);
    });
    if (cc.code !== 0) {
      throw new GuestBuildError(`gcc failed:\n${new TextDecoder().decode(cc.stderr)}`);
    }
    const oc = await new Deno.Command("objcopy", {
      args: ["-O", "binary", elf, bin],
      stderr: "piped",
    }).output();
    if (oc.code !== 0) {
      throw new GuestBuildError(`objcopy failed:\n${new TextDecoder().decode(oc.stderr)}`);
    }
    return await Deno.readFile(bin);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
}
