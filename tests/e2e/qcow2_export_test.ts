// A qcow2 image with a backing chain served read-only by the host
// (`--format qcow2 --read-only`, two queues on two IOThreads, each with its
// own qcow2 driver and L2 cache): the built-in client reads the whole disk
// and sees what `qemu-img convert -O raw` sees; writes get IOERR and the
// image files are unchanged.

import assert from "node:assert/strict";
import { firstDifference, hostScratch, startHost } from "./host_util.ts";
import { connect } from "../robustness/robustness_util.ts";
import { oracleBytes, qemuImg, qemuIo } from "../block/qcow2/qemu_tools.ts";

const S_OK = 0, S_IOERR = 1;

Deno.test("qcow2 export: two IOThreads read a qcow2 -> qcow2 -> raw chain like qemu-img", async () => {
  const s = await hostScratch("qcow2-export", 0);
  const base = `${s.dir}/base.raw`, mid = `${s.dir}/mid.qcow2`, top = `${s.dir}/top.qcow2`;
  qemuImg("create", "-q", "-f", "raw", base, "6M");
  qemuIo(base, "raw", "write -P 0x10 0 6M");
  qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid);
  qemuIo(mid, "qcow2", "write -P 0x20 1m 1m", "write -z 3m 256k", "write -c -P 0x21 5m 64k");
  qemuImg(
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "cluster_size=16k",
    "-b",
    "mid.qcow2",
    "-F",
    "qcow2",
    top,
    "8M",
  );
  qemuIo(top, "qcow2", "write -P 0x30 1500k 40k", "write -P 0x31 7m 100k", "discard 5m 16k");
  const want = oracleBytes(top);
  const before = [base, mid, top].map((f) => Deno.readFileSync(f));
  const args = ["--image", top, "--socket", s.socket, "--format", "qcow2"];
  const { host } = await startHost([...args, "--read-only", "--queues", "2", "--iothreads", "2"]);
  try {
    const c = await connect(s.socket, { numQueues: 2 });
    try {
      assert.ok(c.readOnly);
      assert.equal(c.config.capacity * 512, 8 << 20);
      const chunk = 64 * 1024 + 4096;
      for (let off = 0, i = 0; off < want.length; off += chunk, i++) {
        const len = Math.min(chunk, want.length - off);
        const qi = i % 2;
        assert.equal(await c.execute(qi, (q) => q.read(0, off, len)), S_OK, `read ${off}`);
        const got = c.queues[qi].data(0).subarray(0, len);
        const diff = firstDifference(got, want.subarray(off, off + len));
        assert.equal(diff, -1, `queue ${qi}: byte ${off + diff} differs`);
      }
      c.queues[0].data(0).fill(0xab, 0, 4096);
      assert.equal(await c.execute(0, (q) => q.write(0, 0, 4096)), S_IOERR);
    } finally {
      await c.close();
    }
  } finally {
    await host.stop();
    [base, mid, top].forEach((f, i) => assert.deepEqual(Deno.readFileSync(f), before[i], f));
    await s.remove();
  }
});
