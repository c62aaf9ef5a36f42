/**
 * A fast-check model test of the qcow2 write path: random sequences of
 * writes (some concurrent), write-zeroes, discards, flushes and reads on
 * images made by qemu-img (fresh, over a backing file, with compressed and
 * zero clusters), through Qcow2Driver over an in-memory file, against a
 * byte model. Every read matches the model; afterwards the image (written
 * to a file) passes `qemu-img check` without corruption and `qemu-img
 * compare` finds it equal to the model. Discarded clusters read as before
 * or as zeroes (the model takes what is read).
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { AioContext } from "../../../aio/mod.ts";
import { type BlockDriver, IoVector } from "../../../block/mod.ts";
import { Qcow2Driver } from "../../../block/qcow2/mod.ts";
import { runUntil } from "../helpers.ts";
import { MemDriver } from "./mem_driver.ts";
import { readDriver } from "./bad_image_util.ts";
import { assertCheckClean, qemuImg, qemuIo, run, tempDir } from "./qemu_tools.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };
const SIZE = 1 << 20;

interface Sample {
  name: string;
  bytes: Uint8Array;
  cs: number;
  backing: Uint8Array | null;
}

function makeSamples(): Sample[] {
  const d = tempDir();
  try {
    const out: Sample[] = [];
    const mk = (name: string, o: string, cs: number, cmds: string[], backing = false) => {
      const img = `${d}/${name}.qcow2`;
      const b = backing ? ["-b", `${d}/base.raw`, "-F", "raw"] : [];
      qemuImg("create", "-q", "-f", "qcow2", "-o", o, ...b, img, String(SIZE));
      if (cmds.length) qemuIo(img, "qcow2", ...cmds);
      out.push({
        name,
        bytes: Deno.readFileSync(img),
        cs,
        backing: backing ? Deno.readFileSync(`${d}/base.raw`) : null,
      });
    };
    qemuImg("create", "-q", "-f", "raw", `${d}/base.raw`, String(SIZE));
    qemuIo(`${d}/base.raw`, "raw", "write -P 0x3c 0 1M");
    mk("fresh-64k", "cluster_size=65536", 65536, []);
    mk("v2-4k", "compat=0.10,cluster_size=4096", 4096, ["write -P 0x11 8k 20k"]);
    mk(
      "backed-16k",
      "cluster_size=16384",
      16384,
      ["write -z 0 64k", "write -c -P 0x22 256k 16k"],
      true,
    );
    mk("small-512", "cluster_size=512,refcount_bits=2", 512, ["write -P 0x33 0 4k"]);
    return out;
  } finally {
    Deno.removeSync(d, { recursive: true });
  }
}

const samples = makeSamples();

type Op =
  | { t: "write"; off: number; len: number; fill: number; n: number }
  | { t: "zero" | "discard"; off: number; len: number }
  | { t: "flush" }
  | { t: "read"; off: number; len: number };

const span = fc.record({
  off: fc.nat({ max: SIZE - 1 }),
  len: fc.integer({ min: 1, max: 140_000 }),
});
const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 5,
    arbitrary: fc.record({
      t: fc.constant("write" as const),
      off: span.map((s) => s.off),
      len: span.map((s) => s.len),
      fill: fc.integer({ min: 1, max: 255 }),
      n: fc.integer({ min: 1, max: 4 }),
    }),
  },
  { weight: 1, arbitrary: span.map((s) => ({ t: "zero" as const, ...s })) },
  { weight: 1, arbitrary: span.map((s) => ({ t: "discard" as const, ...s })) },
  { weight: 1, arbitrary: fc.constant({ t: "flush" as const }) },
  { weight: 2, arbitrary: span.map((s) => ({ t: "read" as const, ...s })) },
);

function done(p: (cb: (ret: number) => void) => void): Promise<number> {
  return new Promise((resolve) => p(resolve));
}

async function runCase(ctx: AioContext, s: Sample, ops: Op[]): Promise<void> {
  const file = new MemDriver(ctx, s.bytes.slice(), true);
  const backing: BlockDriver | null = s.backing ? new MemDriver(ctx, s.backing) : null;
  const d = await runUntil(
    ctx,
    Qcow2Driver.open(ctx, file, {
      readOnly: false,
      openBacking: backing ? () => Promise.resolve(backing) : undefined,
    }),
  );
  // The model starts as the guest's view of the image before any op.
  const model = new Uint8Array(SIZE);
  for (let off = 0; off < SIZE; off += 65536) {
    const [ret, buf] = await readDriver(ctx, d, off, 65536);
    assert.equal(ret, 0);
    model.set(buf, off);
  }
  for (const op of ops) {
    if (op.t === "flush") {
      assert.equal(await runUntil(ctx, done((cb) => d.flush(cb))), 0);
      continue;
    }
    const len = Math.min(op.len, SIZE - op.off);
    if (op.t === "write") {
      // `n` writes side by side, submitted together (allocations queue up).
      const each = Math.max(1, Math.floor(len / op.n));
      const ps: Promise<number>[] = [];
      for (let k = 0; k < op.n && op.off + k * each < SIZE; k++) {
        const at = op.off + k * each, l = Math.min(each, SIZE - at);
        const data = new Uint8Array(l).fill((op.fill + k) & 0xff || 1);
        model.set(data, at);
        ps.push(done((cb) => d.pwritev(at, IoVector.fromBuffers([data]), cb)));
      }
      const rets = await runUntil(ctx, Promise.all(ps));
      assert(rets.every((r) => r === 0), `write: ${rets}`);
    } else if (op.t === "zero") {
      assert.equal(await runUntil(ctx, done((cb) => d.pwriteZeroes(op.off, len, false, cb))), 0);
      model.fill(0, op.off, op.off + len);
    } else if (op.t === "discard") {
      assert.equal(await runUntil(ctx, done((cb) => d.pdiscard(op.off, len, cb))), 0);
      const [ret, got] = await readDriver(ctx, d, op.off, len);
      assert.equal(ret, 0);
      const before = model.subarray(op.off, op.off + len);
      for (let j = 0; j < len; j++) {
        if (got[j] !== before[j] && got[j] !== 0) {
          assert.fail(`discard left garbage at ${op.off + j}`);
        }
      }
      model.set(got, op.off);
    } else {
      const [ret, got] = await readDriver(ctx, d, op.off, len);
      assert.equal(ret, 0);
      for (let j = 0; j < len; j++) {
        if (got[j] !== model[op.off + j]) assert.fail(`read ${op.off}+${len} differs at +${j}`);
      }
    }
  }
  await runUntil(ctx, d.close());
  // What QEMU makes of the result.
  const dir = tempDir();
  try {
    const img = `${dir}/m.qcow2`, raw = `${dir}/model.raw`;
    Deno.writeFileSync(img, file.bytes);
    if (s.backing) {
      Deno.writeFileSync(`${dir}/base.raw`, s.backing);
      qemuImg("rebase", "-u", "-b", "base.raw", "-F", "raw", img);
    }
    assertCheckClean(img);
    Deno.writeFileSync(raw, model);
    run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", img, raw]);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

Deno.test(
  "qcow2 model: random op sequences match a byte model and pass qemu-img check",
  opts,
  async () => {
    const ctx = new AioContext();
    try {
      await fc.assert(
        fc.asyncProperty(
          fc.nat({ max: samples.length - 1 }),
          fc.array(opArb, { minLength: 1, maxLength: 25 }),
          (which, ops) => runCase(ctx, samples[which], ops),
        ),
        { numRuns: 100 },
      );
    } finally {
      ctx.close();
    }
  },
);
