// QMP monitor under arbitrary input (fast-check): batches of lines that are
// garbage, JSON of any shape, or commands with random arguments, sent in
// random chunks. Every non-blank line gets exactly one reply, in order, the
// connection stays up, and the daemon still answers afterwards.
import assert from "node:assert/strict";
import fc from "fast-check";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { QmpTestClient } from "./qmp_test_client.ts";

const COMMANDS = [
  "query-version",
  "query-commands",
  "query-named-block-nodes",
  "query-block-exports",
  "query-iothreads",
  "blockdev-add",
  "blockdev-del",
  "block-export-del",
  "object-del",
  "block_resize",
  "qmp_capabilities",
  "no-such-command",
];

const jsonValue = fc.jsonValue({ maxDepth: 3 });
const args = fc.oneof(
  fc.dictionary(
    fc.constantFrom("driver", "node-name", "size", "id", "filename", "file", "read-zeroes", "x"),
    fc.oneof(
      jsonValue,
      fc.constantFrom("null-co", "null-aio", "file", "raw", "qcow2", "n0", "n1", "/nonexistent"),
    ),
    { noNullPrototype: true },
  ),
  jsonValue,
);
const command = fc.record({ execute: fc.constantFrom(...COMMANDS), arguments: args }, {
  requiredKeys: ["execute"],
}).map((o) => JSON.stringify(o));
const line = fc.oneof(
  command,
  jsonValue.map((v) => JSON.stringify(v)),
  fc.string({ maxLength: 40 }).map((s) => s.replaceAll("\n", " ")),
);

Deno.test("QMP (fast-check): any batch of lines gets one reply per line, in order", async () => {
  const dir = await Deno.makeTempDir({ prefix: "qmp-fuzz-" });
  const d = new StorageDaemon();
  let c: QmpTestClient | null = null;
  try {
    d.chardevAdd({ id: "m0", path: `${dir}/qmp.sock`, wait: false });
    await d.monitorAdd("m0", false);
    c = await QmpTestClient.connect(`${dir}/qmp.sock`);
    const client = c;
    let round = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.array(line, { maxLength: 12 }),
        fc.integer({ min: 1, max: 64 }),
        async (lines, chunk) => {
          const id = `sentinel-${round++}`;
          const text = lines.join("\n") + `\n{"execute": "query-version", "id": "${id}"}\n`;
          const bytes = new TextEncoder().encode(text);
          for (let off = 0; off < bytes.length; off += chunk) {
            await client.sendRaw(bytes.subarray(off, off + chunk));
          }
          const expected = lines.filter((l) => l.trim() !== "").length;
          for (let i = 0; i < expected; i++) {
            const r = await client.reply();
            assert("return" in r || "error" in r, JSON.stringify(r));
            if ("error" in r) {
              const e = r.error as { class: string; desc: string };
              assert.equal(typeof e.class, "string");
              assert.equal(typeof e.desc, "string");
            }
          }
          const last = await client.reply();
          assert.equal(last.id, id, `expected the sentinel, got ${JSON.stringify(last)}`);
        },
      ),
      { numRuns: 150 },
    );
  } finally {
    c?.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
