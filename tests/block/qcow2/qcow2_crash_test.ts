/**
 * Crash consistency (issue 14, item 3): a writer process allocating qcow2
 * clusters (copy on write over a raw backing file, four writes in flight)
 * is killed with SIGKILL at a random moment; then `qemu-img check` finds no
 * corruption (leaks allowed), every write the writer saw flushed reads back,
 * and every other slot holds either its backing data or exactly its own
 * write (no torn or misdirected cluster).
 */
import assert from "node:assert/strict";
import { assertCheckClean, oracleBytes, qemuImg, qemuIo, tempDir } from "./qemu_tools.ts";
import { SLOT_BYTES, slotTag } from "./fixtures/slot_tag.ts";

const WRITER = new URL("./fixtures/qcow2_writer.ts", import.meta.url).pathname;

async function crashOnce(dir: string, run: number, cache: string, aio: string): Promise<number> {
  const base = `${dir}/base-${run}.raw`, img = `${dir}/crash-${run}.qcow2`;
  qemuImg("create", "-q", "-f", "raw", base, "32M");
  qemuIo(base, "raw", "write -P 0x11 0 32M");
  qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", img);
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--no-check", WRITER, img, cache, aio],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const out: string[] = [];
  const dec = new TextDecoder();
  const reader = (async () => {
    for await (const chunk of child.stdout) out.push(dec.decode(chunk));
  })();
  const errText = new Response(child.stderr).text();
  // Kill once some writes are flushed, at a random point after that.
  const start = Date.now();
  while (!out.join("").includes("flushed") && Date.now() - start < 20_000) {
    await new Promise((r) => setTimeout(r, 10));
  }
  await new Promise((r) => setTimeout(r, 10 + Math.random() * 300));
  child.kill("SIGKILL");
  const status = await child.status;
  await reader;
  const err = await errText;
  const lines = out.join("").trim().split("\n").filter((l) => l.startsWith("flushed "));
  assert(lines.length > 0, `writer flushed nothing: ${err}`);
  assert.equal(status.signal, "SIGKILL", `writer ended by itself (${status.code}): ${err}`);
  const flushed = Number(lines[lines.length - 1].split(" ")[1]);

  assertCheckClean(img);
  const disk = oracleBytes(img);
  const slots = disk.length / SLOT_BYTES;
  const owner = new Map<number, number>();
  for (let k = 0; k < slots; k++) owner.set((k * 2741) % slots, k);
  let written = 0;
  for (let s = 0; s < slots; s++) {
    const k = owner.get(s)!;
    const got = disk.subarray(s * SLOT_BYTES, (s + 1) * SLOT_BYTES);
    const mine = slotTag(k);
    const isMine = got.every((b, j) => b === mine[j]);
    if (k < flushed) assert(isMine, `run ${run}: flushed write ${k} (slot ${s}) lost`);
    else if (!isMine) {
      assert(
        got.every((b) => b === 0x11),
        `run ${run}: slot ${s} is neither backing nor write ${k}`,
      );
    }
    if (isMine) written++;
  }
  assert(written >= flushed);
  return flushed;
}

Deno.test("qcow2 crash: SIGKILL during allocating writes loses nothing flushed", {
  sanitizeResources: false,
  sanitizeOps: false,
}, async () => {
  const dir = tempDir();
  try {
    const seen: number[] = [];
    seen.push(await crashOnce(dir, 0, "writeback", "threads"));
    seen.push(await crashOnce(dir, 1, "none", "io_uring"));
    seen.push(await crashOnce(dir, 2, "writeback", "io_uring"));
    console.log(`qcow2 crash: flushed writes at the kill: ${seen.join(", ")}`);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
