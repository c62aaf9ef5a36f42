// `addr.type=fd`: an export on a listening socket the daemon was given (as
// qsd's, e.g. from systemd socket activation); a descriptor that is not a
// listening socket is refused with an error and nothing leaks. And a
// monitor chardev with `wait=on` (qsd's default for a server): start-up
// waits until a client connects.
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { parseExport } from "../../../dataplane/daemon/block_export.ts";
import { parseKeyval } from "../../../dataplane/daemon/keyval.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { bindUnix, close, eventfd, isOpen, listen, socketUnix } from "../../../sys/mod.ts";
import { QmpTestClient } from "./qmp_test_client.ts";

Deno.test("daemon: an export on an inherited listening fd (addr.type=fd)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "export-fd-" });
  const d = new StorageDaemon();
  const efd = eventfd();
  try {
    const fd = socketUnix();
    bindUnix(fd, `${dir}/given.sock`);
    listen(fd, 4);
    d.blockdevAdd({ driver: "null-co", "node-name": "n0", size: 1 << 20 }, false);
    d.blockdevAdd({ driver: "null-co", "node-name": "n1", size: 1 << 20 }, false);
    const spec = parseExport(
      parseKeyval(`type=vhost-user-blk,id=e0,node-name=n0,addr.type=fd,addr.str=${fd}`),
      true,
    );
    assert.deepEqual(spec.addr, { type: "fd", fd });
    await d.exportAdd(spec);
    const c = await VhostUserBlkClient.connect(`${dir}/given.sock`);
    assert.equal(c.config.capacity, 2048);
    assert(c.readOnly, "writable defaults to off");
    assert.equal(await c.execute(0, (q) => q.read(0, 0, 4096)), 0);
    await c.close();

    // Not a socket: refused; the node stays free for another export.
    await assert.rejects(
      d.exportAdd({ ...spec, id: "e1", nodeName: "n1", addr: { type: "fd", fd: efd } }),
      /not a socket|Socket operation on non-socket|ENOTSOCK/,
    );
    assert(isOpen(efd));
    assert.equal(d.graph.get("n1").users.size, 0);
    assert.throws(
      () =>
        parseExport(
          parseKeyval("type=vhost-user-blk,id=e,node-name=n,addr.type=fd,addr.str=x"),
          true,
        ),
      { message: "Unable to parse FD number x" },
    );
    await d.exportDel("e0", false);
    assert(!isOpen(fd), "the export owned the fd and closed it");
  } finally {
    close(efd);
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("daemon: a monitor with wait=on holds start-up until a client connects", async () => {
  const dir = await Deno.makeTempDir({ prefix: "monitor-wait-" });
  const d = new StorageDaemon();
  try {
    d.chardevAdd({ id: "m0", path: `${dir}/qmp.sock`, wait: true });
    let done = false;
    const added = d.monitorAdd("m0", false).then(() => done = true);
    await new Promise((r) => setTimeout(r, 100));
    assert(!done, "still waiting for a client");
    const c = await QmpTestClient.connect(`${dir}/qmp.sock`);
    await added;
    assert("return" in await c.execute("query-version"));
    c.close();
  } finally {
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
