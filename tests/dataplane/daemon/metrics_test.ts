// `--metrics`: scrape the daemon's Prometheus endpoint over HTTP, parse the
// text with a real exposition-format parser (parse-prometheus-text-format,
// prom2json's output), and check every counter against what the built-in
// client did on two exports: requests by type, bytes, errors, the latency
// histogram's count, kicks and notifies, in flight, connections, IOThread
// CPU time.
import assert from "node:assert/strict";
import parsePrometheusTextFormat from "parse-prometheus-text-format";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK } from "../../../client/virtio_blk_defs.ts";
import { daemonMain } from "../../../dataplane/daemon/daemon_main.ts";
import { parseDaemonArgs } from "../../../dataplane/daemon/daemon_args.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";

/** prom2json's shape, as the parser returns it. */
interface Family {
  name: string;
  help: string;
  type: string;
  metrics: {
    value?: string;
    labels?: Record<string, string>;
    buckets?: Record<string, string>;
    count?: string;
    sum?: string;
  }[];
}
const parse = parsePrometheusTextFormat as (text: string) => Family[];

function sample(fams: Family[], name: string, labels: Record<string, string>): number {
  const f = fams.find((x) => x.name === name);
  assert(f, `no family ${name}`);
  const m = f.metrics.find((s) => Object.entries(labels).every(([k, v]) => s.labels?.[k] === v));
  assert(m, `no sample ${name}${JSON.stringify(labels)}`);
  return Number(m.value ?? m.count);
}

/** One labelled histogram series of `name`, parsed alone (its other labels dropped). */
function histogramSeries(text: string, name: string, series: string): Family["metrics"][number] {
  const lines = text.split("\n").filter((l) => l.startsWith(`${name}_`) && l.includes(`{${series}`))
    .map((l) => l.replace(`${series},`, "").replace(`{${series}}`, ""));
  assert(lines.length > 0, `no series ${series}`);
  const f = parse(`# TYPE ${name} histogram\n${lines.join("\n")}\n`);
  assert.equal(f.length, 1);
  assert.equal(f[0].metrics.length, 1);
  return f[0].metrics[0];
}

Deno.test("metrics: a scrape parsed by a real parser matches what the client did", async () => {
  const dir = await Deno.makeTempDir({ prefix: "metrics-" });
  const d = new StorageDaemon();
  d.latencyHistogram = true;
  let a: VhostUserBlkClient | null = null, b: VhostUserBlkClient | null = null;
  try {
    await d.objectAdd({ id: "io0", pollMaxNs: 0, aioMaxBatch: 4 });
    for (const id of ["a", "b"]) {
      d.blockdevAdd({ driver: "null-co", "node-name": id, size: 1 << 20 }, false);
      await d.exportAdd({
        id,
        nodeName: id,
        addr: { type: "unix", path: `${dir}/${id}.sock` },
        writable: true,
        writethrough: false,
        numQueues: 2,
        logicalBlockSize: 512,
        iothread: "io0",
      });
    }
    await d.metricsAdd("127.0.0.1", 0);
    a = await VhostUserBlkClient.connect(`${dir}/a.sock`, { numQueues: 2 });
    b = await VhostUserBlkClient.connect(`${dir}/b.sock`);
    // a: queue 0: 10 reads of 4 KiB, 1 read past the end (IOERR); queue 1:
    // 5 writes of 8 KiB, 2 flushes, 1 discard, 1 GET_ID. b: 3 reads of 512 B.
    for (let i = 0; i < 10; i++) {
      assert.equal(await a.execute(0, (q) => q.read(0, i * 4096, 4096)), VIRTIO_BLK_S_OK);
    }
    assert.equal(await a.execute(0, (q) => q.read(0, 1 << 20, 4096)), VIRTIO_BLK_S_IOERR);
    for (let i = 0; i < 5; i++) {
      assert.equal(await a.execute(1, (q) => q.write(0, i * 8192, 8192)), VIRTIO_BLK_S_OK);
    }
    for (let i = 0; i < 2; i++) assert.equal(await a.execute(1, (q) => q.flush(0)), 0);
    assert.equal(await a.execute(1, (q) => q.discard(0, 0, 4096)), VIRTIO_BLK_S_OK);
    assert.equal(await a.execute(1, (q) => q.getId(0)), VIRTIO_BLK_S_OK);
    for (let i = 0; i < 3; i++) assert.equal(await b.execute(0, (q) => q.read(0, 0, 512)), 0);

    const r = await fetch(`http://127.0.0.1:${d.metrics!.port}/metrics`);
    assert.equal(r.status, 200);
    assert.match(r.headers.get("content-type")!, /^text\/plain; version=0\.0\.4/);
    const text = await r.text();
    const fams = parse(text);
    const req = (exp: string, queue: string, type: string) =>
      sample(fams, "dataplane_requests_total", { export: exp, queue, type });
    // The read past the end is refused by the parser: an error, not a read.
    assert.equal(req("a", "0", "read"), 10);
    assert.equal(
      sample(fams, "dataplane_requests_completed_total", { export: "a", queue: "0" }),
      11,
    );
    assert.equal(req("a", "1", "write"), 5);
    assert.equal(req("a", "1", "flush"), 2);
    assert.equal(req("a", "1", "discard"), 1);
    assert.equal(req("a", "1", "get_id"), 1);
    assert.equal(req("a", "0", "write"), 0);
    assert.equal(req("b", "0", "read"), 3);
    assert.equal(
      sample(fams, "dataplane_request_errors_total", { export: "a", queue: "0", status: "ioerr" }),
      1,
    );
    assert.equal(
      sample(fams, "dataplane_bytes_total", { export: "a", queue: "0", direction: "read" }),
      10 * 4096,
    );
    assert.equal(
      sample(fams, "dataplane_bytes_total", { export: "a", queue: "1", direction: "write" }),
      5 * 8192,
    );
    assert.equal(
      sample(fams, "dataplane_bytes_total", { export: "b", queue: "0", direction: "read" }),
      3 * 512,
    );
    // The histogram counts every completed request; its buckets are cumulative.
    // The parser merges labelled histogram series into one (it keys buckets
    // by `le` alone), so each series' own lines go through it separately.
    const lat = fams.find((f) => f.name === "dataplane_request_latency_seconds")!;
    assert.equal(lat.type, "HISTOGRAM");
    const a1 = histogramSeries(text, "dataplane_request_latency_seconds", 'export="a",queue="1"');
    assert.equal(Number(a1.count), 9);
    assert.equal(Number(a1.buckets!["+Inf"]), 9);
    // (Object key order puts le="1" first: sort by le.)
    const buckets = Object.entries(a1.buckets!).map((
      [le, n],
    ) => [le === "+Inf" ? Infinity : Number(le), Number(n)])
      .sort((x, y) => x[0] - y[0]);
    assert.equal(buckets.length, 16);
    assert.equal(buckets[15][0], Infinity);
    const counts = buckets.map(([, n]) => n);
    assert.deepEqual(counts, [...counts].sort((x, y) => x - y), "cumulative");
    assert(Number(a1.sum) > 0 && Number(a1.sum) < 9 * 10, `sum ${a1.sum}`);
    const b0 = histogramSeries(text, "dataplane_request_latency_seconds", 'export="b",queue="0"');
    assert.equal(Number(b0.count), 3);
    // The client kicked for each request and waited for each.
    assert(sample(fams, "dataplane_kicks_total", { export: "b", queue: "0" }) >= 1);
    // (A notify the driver's used_event did not ask for is skipped: 1 to 3.)
    const notifies = sample(fams, "dataplane_notifies_total", { export: "b", queue: "0" });
    assert(notifies >= 1 && notifies <= 3, `notifies ${notifies}`);
    assert.equal(sample(fams, "dataplane_requests_in_flight", { export: "a" }), 0);
    assert.equal(sample(fams, "dataplane_export_connected", { export: "a" }), 1);
    assert.equal(sample(fams, "dataplane_export_connections_total", { export: "b" }), 1);
    assert.equal(sample(fams, "dataplane_queue_broken", { export: "a", queue: "0" }), 0);
    assert(sample(fams, "dataplane_iothread_busy_seconds_total", { iothread: "io0" }) >= 0);
    // Anything else is 404.
    const nf = await fetch(`http://127.0.0.1:${d.metrics!.port}/`);
    assert.equal(nf.status, 404);
    await nf.body?.cancel();
  } finally {
    await a?.close();
    await b?.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("metrics: --metrics on the command line; a bad address is a usage error", async () => {
  const a = parseDaemonArgs(["--metrics", "127.0.0.1:9100", "--metrics", "[::1]:0"]);
  assert.deepEqual(a.options.map((o) => o.kind === "metrics" && [o.hostname, o.port]), [
    ["127.0.0.1", 9100],
    ["::1", 0],
  ]);
  const lines: string[] = [];
  const orig = console.error;
  console.error = (...x: unknown[]) => lines.push(x.join(" "));
  try {
    assert.equal(await daemonMain(["--metrics", "9100"]), 1);
  } finally {
    console.error = orig;
  }
  assert.deepEqual(lines, [
    "dataplane: --metrics 9100: expects ADDR:PORT (e.g. 127.0.0.1:9100)",
  ]);
});
