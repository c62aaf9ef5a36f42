// eventfdWrite and eventfdRead run on the data path of every IOThread (kicks,
// guest notifications, aio_notify): they must allocate nothing, or the
// young-generation GCs they cause pause the IOThread (~0.2 ms each). With
// `isize` results for read(2)/write(2) a million writes caused ~190 GCs.

import assert from "node:assert/strict";
import { REPO_ROOT } from "../harness/mod.ts";

Deno.test("eventfdWrite/eventfdRead: a million calls cause no GC", async () => {
  const out = await new Deno.Command(`${REPO_ROOT}/deno`, {
    args: [
      "run",
      "-A",
      "--no-check",
      "--v8-flags=--trace-gc,--max-semi-space-size=1",
      "tests/sys/fixtures/eventfd_loop.ts",
    ],
    cwd: REPO_ROOT,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
  const measured = text.slice(text.indexOf("measuring"), text.indexOf("done"));
  assert.ok(text.includes("done"), text);
  const gcs = measured.split("\n").filter((l) => /Scavenge|Mark-Compact|Mark-sweep/.test(l));
  assert.equal(gcs.length, 0, `GCs while writing: ${gcs.slice(0, 3).join("\n")}`);
});
