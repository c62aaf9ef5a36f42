// Live resize on the vhost-user level (issue 15, 4), with the built-in
// client playing QEMU's part: it negotiates VHOST_USER_PROTOCOL_F_BACKEND_REQ,
// hands over its end of a socketpair with SET_BACKEND_REQ_FD, and on
// block_resize receives VHOST_USER_BACKEND_CONFIG_CHANGE_MSG with NEED_REPLY
// (REPLY_ACK negotiated), answers it, and reads the new capacity. A
// front-end that never answers costs the daemon a bounded wait, not a hang;
// a channel fd that is not a socket, or one sent without the feature, is
// refused and the session goes on.
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { FrontendError } from "../../../client/frontend.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import {
  close,
  eventfd,
  recvMsg,
  sendMsg,
  SOCK_NONBLOCK,
  socketpair,
  WOULD_BLOCK,
} from "../../../sys/mod.ts";
import {
  encodeMessage,
  VHOST_USER_BACKEND_CONFIG_CHANGE_MSG,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_PROTOCOL_F_BACKEND_REQ,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_SET_BACKEND_REQ_FD,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_VERSION,
} from "../../../vhost_user/mod.ts";

const MiB = 1 << 20;

/** Reads one 12-byte header from the non-blocking channel, waiting up to `ms`. */
async function readHeader(fd: number, ms = 5000): Promise<DataView | null> {
  const buf = new Uint8Array(12);
  let got = 0;
  const end = Date.now() + ms;
  while (got < 12) {
    const n = recvMsg(fd, buf.subarray(got), 0).n;
    if (n === 0) return null;
    if (n === WOULD_BLOCK) {
      if (Date.now() > end) return null;
      await new Promise((r) => setTimeout(r, 5));
      continue;
    }
    got += n;
  }
  return new DataView(buf.buffer);
}

Deno.test("live resize: CONFIG_CHANGE_MSG on the back-end channel, acked; a silent front-end times out", async () => {
  const dir = await Deno.makeTempDir({ prefix: "live-resize-" });
  const image = `${dir}/disk.raw`;
  Deno.writeFileSync(image, new Uint8Array(0));
  Deno.truncateSync(image, 4 * MiB);
  const logs: string[] = [];
  const d = new StorageDaemon((l) => logs.push(l));
  let c: VhostUserBlkClient | null = null;
  const fds: number[] = [];
  try {
    d.blockdevAdd({ driver: "file", "node-name": "f0", filename: image }, false);
    await d.exportAdd({
      id: "e0",
      nodeName: "f0",
      addr: { type: "unix", path: `${dir}/e0.sock` },
      writable: true,
      writethrough: false,
      numQueues: 1,
      logicalBlockSize: 512,
    });
    c = await VhostUserBlkClient.connect(`${dir}/e0.sock`);
    assert(c.frontend.replyAck);
    const [ours, theirs] = socketpair(SOCK_NONBLOCK);
    fds.push(ours);
    // Without the feature negotiated the channel is refused (and the fd closed by the daemon).
    await assert.rejects(
      c.frontend.request(VHOST_USER_SET_BACKEND_REQ_FD, { kind: "empty" }, [theirs]),
      FrontendError,
    );
    const offered = c.protocolFeatures | (1n << BigInt(VHOST_USER_PROTOCOL_F_BACKEND_REQ));
    await c.frontend.request(VHOST_USER_SET_PROTOCOL_FEATURES, { kind: "u64", value: offered });
    // Not a socket: refused too.
    const efd = eventfd();
    fds.push(efd);
    await assert.rejects(
      c.frontend.request(VHOST_USER_SET_BACKEND_REQ_FD, { kind: "empty" }, [efd]),
      FrontendError,
    );
    await c.frontend.request(VHOST_USER_SET_BACKEND_REQ_FD, { kind: "empty" }, [theirs]);
    close(theirs);

    // Grow: the message arrives with NEED_REPLY; we ack it; resize completes.
    const resized = d.blockResize("f0", 8 * MiB);
    const h = await readHeader(ours);
    assert(h !== null, "a back-end message arrived");
    assert.equal(h.getUint32(0, true), VHOST_USER_BACKEND_CONFIG_CHANGE_MSG);
    assert.equal(h.getUint32(4, true), VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK);
    assert.equal(h.getUint32(8, true), 0);
    sendMsg(
      ours,
      encodeMessage(
        VHOST_USER_BACKEND_CONFIG_CHANGE_MSG,
        VHOST_USER_VERSION | VHOST_USER_REPLY_MASK,
        { kind: "u64", value: 0n },
      ),
    );
    await resized;
    assert(logs.some((l) => l.endsWith("config change to the front-end: acked")), logs.join("\n"));
    assert.equal((await c.readConfig()).capacity, 8 * MiB / 512);

    // A front-end that does not answer: the resize still completes, after the bounded wait.
    const t0 = Date.now();
    await d.blockResize("f0", 6 * MiB);
    assert(Date.now() - t0 < 10_000);
    assert(
      logs.some((l) => l.endsWith("config change to the front-end: timeout")),
      logs.join("\n"),
    );
    assert.equal((await c.readConfig()).capacity, 6 * MiB / 512);
    // The session goes on.
    assert.equal(await c.execute(0, (q) => q.read(0, 5 * MiB, 4096)), 0);
  } finally {
    await c?.close();
    for (const fd of fds) close(fd);
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
