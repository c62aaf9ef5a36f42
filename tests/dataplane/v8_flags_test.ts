// The host's V8 flags live in one constant (dataplane/v8_flags.ts) that the
// daemon's --daemonize and the benchmarks use; deno.json's tasks cannot
// import it, so this keeps them equal.

import assert from "node:assert/strict";
import { HOST_V8_FLAGS_ARG } from "../../dataplane/mod.ts";
import { ourHostArgs } from "../../bench/compare_servers.ts";
import { REPO_ROOT } from "../harness/mod.ts";

Deno.test("deno task host, demo and vm run with HOST_V8_FLAGS, as compare starts the host", async () => {
  const cfg = JSON.parse(await Deno.readTextFile(`${REPO_ROOT}/deno.json`)) as {
    tasks: Record<string, string>;
  };
  for (const task of ["host", "demo", "vm"]) {
    const words = cfg.tasks[task].split(/\s+/);
    assert.deepEqual(words.filter((w) => w.startsWith("--v8-flags")), [HOST_V8_FLAGS_ARG], task);
  }
  const args = ourHostArgs({
    backend: "null-co",
    image: "",
    nullSize: 1 << 30,
    queues: 1,
    iothreads: 1,
    socket: "/tmp/x.sock",
  });
  assert.ok(args.indexOf(HOST_V8_FLAGS_ARG) < args.indexOf("dataplane/main.ts"), args.join(" "));
});
