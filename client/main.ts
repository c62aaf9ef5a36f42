/**
 * `deno run -A client/main.ts --socket PATH [options]`: connects the built-in
 * vhost-user-blk client to a back-end and runs a workload or verify pass,
 * printing one JSON result.
 *
 * Options: --pattern randread|randwrite|read|write|randrw|rw, --bs 4096,
 * --iodepth 32 (per queue), --queues 1, --duration-ms 5000 | --ops N,
 * --wait block|poll, --verify (pattern write, flush, read back, compare over
 * --span bytes, default 64 MiB).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { VhostUserBlkClient } from "./blk_client.ts";
import { type Pattern, runWorkload, verify } from "./workload.ts";

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      socket: { type: "string" },
      pattern: { type: "string", default: "randread" },
      bs: { type: "string", default: "4096" },
      iodepth: { type: "string", default: "1" },
      queues: { type: "string", default: "1" },
      "duration-ms": { type: "string", default: "5000" },
      ops: { type: "string" },
      wait: { type: "string", default: "block" },
      verify: { type: "boolean", default: false },
      span: { type: "string", default: String(64 << 20) },
    },
  });
  if (!values.socket) {
    console.error("usage: client/main.ts --socket PATH [--pattern P --bs N --iodepth N ...]");
    Deno.exit(2);
  }
  const depth = Number(values.iodepth);
  const bs = Number(values.bs);
  const client = await VhostUserBlkClient.connect(values.socket, {
    numQueues: Number(values.queues),
    queueSize: Math.max(64, 2 ** Math.ceil(Math.log2(3 * depth))),
    slots: depth,
    maxBlockSize: bs,
  });
  try {
    if (values.verify) {
      const r = await verify(client, {
        span: Number(values.span),
        blockSize: bs,
        queueDepth: depth,
        seed: 1,
      });
      console.log(JSON.stringify(r));
      if (r.mismatches || r.errors) Deno.exitCode = 1;
    } else {
      const r = runWorkload(client, {
        pattern: values.pattern as Pattern,
        blockSize: bs,
        queueDepth: depth,
        durationMs: values.ops ? undefined : Number(values["duration-ms"]),
        ops: values.ops ? Number(values.ops) : undefined,
        wait: values.wait as "poll" | "block",
      });
      console.log(JSON.stringify(r));
    }
  } finally {
    await client.close();
  }
}
