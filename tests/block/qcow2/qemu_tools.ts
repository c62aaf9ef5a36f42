/**
 * Test helpers for the qcow2 driver: run qemu-img and qemu-io (the oracle),
 * open an image through our BlockBackend, and read it whole in uneven
 * chunks to compare with `qemu-img convert -O raw`.
 */
import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import { BlockBackend, type BlockOptions, IoVector } from "../../../block/mod.ts";
import { runUntil } from "../helpers.ts";

/** Runs a QEMU tool; throws with its stderr when it fails. Returns stdout. */
export function run(cmd: string, args: string[]): string {
  const out = new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).outputSync();
  const dec = new TextDecoder();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")} failed: ${dec.decode(out.stderr)}`);
  }
  return dec.decode(out.stdout);
}

/** `qemu-img ARGS`. */
export function qemuImg(...args: string[]): string {
  return run("qemu-img", args);
}

/** `qemu-io -f FMT -c CMD... IMAGE` (each command a separate -c). */
export function qemuIo(image: string, fmt: string, ...cmds: string[]): string {
  const args = ["-f", fmt];
  for (const c of cmds) args.push("-c", c);
  args.push(image);
  return run("qemu-io", args);
}

/** A fresh temporary directory for one test's images. */
export function tempDir(): string {
  return Deno.makeTempDirSync({ prefix: "qcow2-test-" });
}

/** What `qemu-img convert -O raw` makes of `image` (the oracle's bytes). */
export function oracleBytes(image: string, fmt = "qcow2"): Uint8Array {
  const raw = `${image}.oracle.raw`;
  qemuImg("convert", "-f", fmt, "-O", "raw", image, raw);
  const b = Deno.readFileSync(raw);
  Deno.removeSync(raw);
  return b;
}

/** What `qemu-img check --output=json` says of a qcow2 image. */
export interface QemuImgCheck {
  /** Exit status (0 clean, 2 corruptions, 3 leaks only...). */
  code: number;
  /** The JSON report as printed. */
  text: string;
  corruptions: number;
  checkErrors: number;
  leaks: number;
}

/** Runs `qemu-img check --output=json` on `image` without asserting anything. */
export function qemuImgCheck(image: string): QemuImgCheck {
  const out = new Deno.Command("qemu-img", {
    args: ["check", "--output=json", "-f", "qcow2", image],
    stdout: "piped",
    stderr: "piped",
  }).outputSync();
  const text = new TextDecoder().decode(out.stdout);
  const r = JSON.parse(text) as { corruptions?: number; "check-errors": number; leaks?: number };
  return {
    code: out.code,
    text,
    corruptions: r.corruptions ?? 0,
    checkErrors: r["check-errors"],
    leaks: r.leaks ?? 0,
  };
}

/** qemu-img check --output=json: corruptions and check errors must be 0. */
export function assertCheckClean(image: string): { leaks: number } {
  const { code, text, corruptions, checkErrors, leaks } = qemuImgCheck(image);
  // Exit 0: clean; 3: leaked clusters only (allowed).
  assert([0, 3].includes(code), `qemu-img check exit ${code}: ${text}`);
  assert.equal(corruptions, 0, text);
  assert.equal(checkErrors, 0, text);
  return { leaks };
}

/** Opens `image` as qcow2, read-only, through BlockBackend.open (polling `ctx`). */
export function openQcow2(
  ctx: AioContext,
  image: string,
  extra: Partial<BlockOptions> = {},
): Promise<BlockBackend> {
  return runUntil(
    ctx,
    BlockBackend.open(ctx, {
      driver: "file",
      filename: image,
      format: "qcow2",
      readOnly: true,
      ...extra,
    }),
  );
}

/** Reads `len` bytes at `offset`; returns [ret, bytes]. */
export async function readAt(
  ctx: AioContext,
  blk: BlockBackend,
  offset: number,
  len: number,
): Promise<[number, Uint8Array]> {
  // Poisoned: a zero or unallocated run the driver forgets to fill shows.
  const buf = new Uint8Array(len).fill(0xee);
  // Two entries when possible: every split path sees a multi-entry vector.
  const cut = len > 1024 ? 512 * Math.floor(len / 1024) : len;
  const qiov = IoVector.fromBuffers(cut < len ? [buf.subarray(0, cut), buf.subarray(cut)] : [buf]);
  const ret = await runUntil(ctx, blk.preadv(offset, qiov));
  return [ret, buf];
}

/**
 * Reads the whole image in chunks whose sizes cycle through `chunks`
 * (uneven, so requests start and end inside clusters and span several) and
 * asserts each read succeeds and matches `expected`.
 */
export async function assertReadsLike(
  ctx: AioContext,
  blk: BlockBackend,
  expected: Uint8Array,
  chunks = [4096, 512, 65536 + 512, 3 * 65536, 1536, 131072],
): Promise<void> {
  assert.equal(blk.length, expected.length);
  let off = 0, i = 0;
  while (off < expected.length) {
    const len = Math.min(chunks[i++ % chunks.length], expected.length - off);
    const [ret, got] = await readAt(ctx, blk, off, len);
    assert.equal(ret, 0, `read at ${off}+${len}`);
    const want = expected.subarray(off, off + len);
    if (!bytesEqual(got, want)) {
      const at = firstDiff(got, want);
      assert.fail(`read at ${off}+${len} differs at +${at}: ${got[at]} != ${want[at]}`);
    }
    off += len;
  }
}

/** Opens, reads whole and compares with the oracle, then closes. */
export async function assertMatchesOracle(
  image: string,
  extra: Partial<BlockOptions> = {},
  chunks?: number[],
): Promise<void> {
  const ctx = new AioContext();
  try {
    const blk = await openQcow2(ctx, image, extra);
    try {
      await assertReadsLike(ctx, blk, oracleBytes(image), chunks);
    } finally {
      await runUntil(ctx, blk.close());
    }
  } finally {
    ctx.close();
  }
}

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function firstDiff(a: Uint8Array, b: Uint8Array): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return a.length;
}
