// `--metrics` with an NBD export: the endpoint's text parses with a real
// exposition-format parser and its NBD families count what a client did.
import assert from "node:assert/strict";
import parsePrometheusTextFormat from "parse-prometheus-text-format";
import { NBD_CMD_READ, NBD_CMD_WRITE } from "../../../block/mod.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { makeScratchDir } from "../../harness/mod.ts";
import { RawNbdClient } from "./nbd_raw_client.ts";

interface Family {
  name: string;
  type: string;
  metrics: { value?: string; labels?: Record<string, string> }[];
}
const parse = parsePrometheusTextFormat as (text: string) => Family[];

function sample(fams: Family[], name: string, labels: Record<string, string>): number {
  const f = fams.find((x) => x.name === name);
  assert(f, `no family ${name}`);
  const m = f.metrics.find((s) => Object.entries(labels).every(([k, v]) => s.labels?.[k] === v));
  assert(m, `no sample ${name}${JSON.stringify(labels)}`);
  return Number(m.value);
}

Deno.test("NBD export metrics: clients, requests, errors, bytes", async () => {
  const dir = await makeScratchDir("nbd-metrics");
  const d = new StorageDaemon();
  try {
    await d.metricsAdd("127.0.0.1", 0);
    await d.nbdServerStart({ addr: { type: "unix", path: `${dir}/nbd.sock` }, maxConnections: 0 });
    d.blockdevAdd({ driver: "null-co", "node-name": "n0", size: "65536" }, true);
    await d.nbdExportAdd({
      id: "e0",
      nodeName: "n0",
      name: "disk",
      description: "",
      writable: true,
    });
    const { client: c } = await RawNbdClient.go(`${dir}/nbd.sock`, "disk");
    const R = RawNbdClient.request;
    for (let i = 0; i < 3; i++) {
      await c.write(R(NBD_CMD_READ, { cookie: BigInt(i), length: 512 }));
      assert.equal((await c.readReply())?.error, 0);
    }
    const w = new Uint8Array(28 + 4);
    w.set(R(NBD_CMD_WRITE, { cookie: 9n, length: 4 }));
    await c.write(w);
    assert.equal((await c.readReply())?.error, 0);
    await c.write(R(NBD_CMD_READ, { cookie: 10n, offset: 65536n, length: 512 }));
    assert.notEqual((await c.readReply())?.error, 0);
    const text = await (await fetch(`http://127.0.0.1:${d.metrics!.port}/metrics`)).text();
    const fams = parse(text);
    const ex = { export: "e0", name: "disk" };
    assert.equal(sample(fams, "dataplane_nbd_clients", ex), 1);
    assert.equal(sample(fams, "dataplane_nbd_connections_total", ex), 1);
    assert.equal(sample(fams, "dataplane_nbd_requests_total", ex), 5);
    assert.equal(sample(fams, "dataplane_nbd_request_errors_total", ex), 1);
    assert.equal(sample(fams, "dataplane_nbd_bytes_total", { ...ex, direction: "read" }), 1536);
    assert.equal(sample(fams, "dataplane_nbd_bytes_total", { ...ex, direction: "write" }), 4);
    assert.equal(fams.find((f) => f.name === "dataplane_nbd_clients")?.type, "GAUGE");
    c.close();
  } finally {
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
