// What each isolate of the host compiles at start-up: every module a V8
// isolate loads stays resident in it (source, bytecode, Deno's module map),
// in the main thread and again in every IOThread. The IOThread's graph is the
// worker entry plus dataplane/blk_iothread.ts; block drivers other than
// file/null/raw/rbd, the NBD export's side and node: modules (Node
// compatibility layer, ~2-4 MiB per isolate) are loaded on demand only.
import assert from "node:assert/strict";

const ROOT = new URL("../../", import.meta.url);

interface InfoModule {
  specifier: string;
  dependencies?: { code?: { specifier?: string }; isDynamic?: boolean }[];
}

/** `deno info --json` of `entries`: every module (static and dynamic imports) and the static closure. */
async function moduleGraph(entries: string[]): Promise<{ all: Set<string>; static: Set<string> }> {
  const modules = new Map<string, InfoModule>();
  for (const e of entries) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["info", "--json", new URL(e, ROOT).href],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert(out.success, new TextDecoder().decode(out.stderr));
    const info = JSON.parse(new TextDecoder().decode(out.stdout)) as { modules: InfoModule[] };
    for (const m of info.modules) modules.set(m.specifier, m);
  }
  const rel = (s: string) => s.startsWith(ROOT.href) ? s.slice(ROOT.href.length) : s;
  const reached = new Set<string>();
  const stack = entries.map((e) => new URL(e, ROOT).href);
  while (stack.length > 0) {
    const s = stack.pop()!;
    if (reached.has(s)) continue;
    reached.add(s);
    for (const d of modules.get(s)?.dependencies ?? []) {
      if (!d.isDynamic && d.code?.specifier) stack.push(d.code.specifier);
    }
  }
  return { all: new Set([...modules.keys()].map(rel)), static: new Set([...reached].map(rel)) };
}

/** Modules only some graphs need: loaded by `import()` when a node or export needs them. */
const ON_DEMAND = [
  "block/qcow2/qcow2_driver.ts",
  "block/qcow2/image_chain.ts",
  "block/nbd/nbd_driver.ts",
  "block/nbd/nbd_client.ts",
  "block/throttle/throttle_driver.ts",
];

/** No ON_DEMAND module statically (they are still reached by import()), no node: module but `allowNode`. */
function assertLean(g: { all: Set<string>; static: Set<string> }, allowNode: string[] = []): void {
  for (const m of ON_DEMAND) {
    assert(g.all.has(m), `${m} is no longer in the graph at all: update this test`);
    assert(!g.static.has(m), `${m} is imported statically`);
  }
  const nodeModules = [...g.static].filter((m) => m.startsWith("node:") && !allowNode.includes(m));
  assert.deepEqual(nodeModules, [], "node: modules loaded at start-up");
}

Deno.test("module graph: an IOThread loads no on-demand driver, NBD export or node: module", async () => {
  const g = await moduleGraph(["aio/iothread_worker.ts", "dataplane/blk_iothread.ts"]);
  assertLean(g);
  assert(![...g.static].some((m) => m.startsWith("dataplane/nbd/")), "dataplane/nbd/ loaded");
  assert(g.static.has("block/file_driver.ts") && g.static.has("block/io_uring_engine.ts"));
});

Deno.test("module graph: the host's main thread loads no on-demand driver nor daemon-only module", async () => {
  // node:util: the short options' parseArgs.
  const g = await moduleGraph(["dataplane/main.ts"]);
  assertLean(g, ["node:util"]);
  // The daemon's syntax, QMP, metrics and NBD export: imported when used.
  for (
    const m of [
      "dataplane/daemon/daemon_main.ts",
      "dataplane/daemon/daemon_args.ts",
      "dataplane/daemon/qmp_server.ts",
      "dataplane/daemon/qmp_commands.ts",
      "dataplane/daemon/metrics.ts",
      "dataplane/nbd/nbd_server.ts",
      "dataplane/nbd/nbd_block_export.ts",
      "dataplane/virtio_blk_dataplane.ts",
    ]
  ) assert(!g.static.has(m), `${m} is imported statically`);
});

Deno.test("IOThreadObject: the NBD export's side is loaded into a thread by the first NBD export only", async () => {
  const { IOThreadObject } = await import("../../dataplane/daemon/iothread_object.ts");
  const io = await IOThreadObject.start({ id: "io0", pollMaxNs: 0, aioMaxBatch: 4 });
  try {
    const noFn = /no exported function nbdStats/;
    await assert.rejects(io.thread.call("nbdStats", { export: "x" }), noFn);
    const nbd = new URL("dataplane/nbd/nbd_iothread.ts", ROOT).href;
    await Promise.all([io.load(nbd), io.load(nbd)]); // once
    await assert.rejects(
      io.thread.call("nbdStats", { export: "x" }),
      (e: Error) => !noFn.test(e.message),
    );
    assert.equal(await io.threadId() > 0, true); // blk_iothread.ts is still there
  } finally {
    await io.stop();
  }
});
