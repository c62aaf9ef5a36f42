import assert from "node:assert/strict";
import { parseHostArgs, UsageError } from "../../dataplane/host_options.ts";

Deno.test("host options: --image nbd://HOST:PORT/EXPORT and nbd+unix:///EXPORT?socket=PATH", () => {
  const t = parseHostArgs(["--image", "nbd://127.0.0.1:10810/disk0", "--socket", "s"]);
  assert.equal(t.block.driver, "nbd");
  assert.deepEqual(t.block.server, { type: "inet", host: "127.0.0.1", port: 10810 });
  assert.equal(t.block.exportName, "disk0");
  assert.equal(t.block.reconnectDelay, 0);
  const u = parseHostArgs([
    "--image",
    "nbd+unix:///e?socket=/run/nbd.sock",
    "--socket",
    "s",
    "--reconnect-delay",
    "5",
  ]);
  assert.deepEqual(u.block.server, { type: "unix", path: "/run/nbd.sock" });
  assert.equal(u.block.exportName, "e");
  assert.equal(u.block.reconnectDelay, 5);
  const v6 = parseHostArgs(["--image", "nbd://[::1]/", "--socket", "s"]);
  assert.deepEqual(v6.block.server, { type: "inet", host: "::1", port: 10809 });
  assert.equal(v6.block.exportName, "");
});

Deno.test("host options: bad NBD images are usage errors", () => {
  for (
    const [args, re] of [
      [["--image", "nbd+unix:///e"], /socket=PATH/],
      [["--image", "nbds://h/e"], /TLS/],
      [["--image", "nbd://h:0/e"], /bad port/],
      [["--image", "nbd://h/e", "--format", "qcow2"], /qcow2 over an NBD/],
      [["--image", "disk.img", "--reconnect-delay", "3"], /option of nbd images/],
      [["--image", "nbd://h/e", "--reconnect-delay", "-1"], /reconnect-delay/],
    ] as [string[], RegExp][]
  ) {
    assert.throws(() => parseHostArgs([...args, "--socket", "s"]), (e) => {
      assert.ok(e instanceof UsageError, String(e));
      assert.match(e.message, re);
      return true;
    });
  }
});
