// The NBD export's protocol handling with a hand-driven client: option
// replies, every transmission error the protocol names, limits on hostile
// input (bad magic, huge lengths, requests past the end, option floods),
// many requests in flight with backpressure; another client keeps being
// served throughout.
import assert from "node:assert/strict";
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EPERM,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
} from "../../../block/mod.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { NBD_MAX_OPTIONS } from "../../../dataplane/nbd/nbd_handshake.ts";
import { NBD_MAX_PAYLOAD, NBD_MAX_REQUESTS } from "../../../dataplane/nbd/nbd_session.ts";
import { makeScratchDir } from "../../harness/mod.ts";
import { RawNbdClient } from "./nbd_raw_client.ts";

const SIZE = 1 << 20;

/** A daemon with a writable export "rw" (a file of 0x61 bytes) and a read-only one "ro". */
async function withDaemon(
  fn: (d: StorageDaemon, sock: string, dir: string) => Promise<void>,
  roSize = SIZE,
) {
  const dir = await makeScratchDir("nbd-proto");
  const d = new StorageDaemon();
  try {
    const sock = `${dir}/nbd.sock`;
    await d.nbdServerStart({ addr: { type: "unix", path: sock }, maxConnections: 0 });
    Deno.writeFileSync(`${dir}/rw.raw`, new Uint8Array(SIZE).fill(0x61));
    d.blockdevAdd({ driver: "file", "node-name": "rw", filename: `${dir}/rw.raw` }, true);
    d.blockdevAdd(
      { driver: "null-co", "node-name": "ro", size: String(roSize), "read-zeroes": "on" },
      true,
    );
    await d.nbdExportAdd({
      id: "rw",
      nodeName: "rw",
      name: "rw",
      description: "the rw disk",
      writable: true,
    });
    await d.nbdExportAdd({
      id: "ro",
      nodeName: "ro",
      name: "ro",
      description: "",
      writable: false,
    });
    await fn(d, sock, dir);
  } finally {
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

/** A fresh client still gets a correct read from "rw": the daemon serves on. */
export async function stillServing(sock: string): Promise<void> {
  const { client } = await RawNbdClient.go(sock, "rw");
  try {
    await client.write(
      RawNbdClient.request(NBD_CMD_READ, { cookie: 77n, offset: 4096n, length: 8 }),
    );
    const r = await client.readReply();
    assert(r !== null);
    assert.equal(r.error, 0);
    assert.equal(r.cookie, 77n);
    assert.equal(r.type, NBD_REPLY_TYPE_OFFSET_DATA);
    assert.equal(r.payload.length, 16);
  } finally {
    client.close();
  }
}

function infoPayload(name: string, infos: number[]): Uint8Array {
  const nb = new TextEncoder().encode(name);
  const p = new Uint8Array(4 + nb.length + 2 + 2 * infos.length);
  const v = new DataView(p.buffer);
  v.setUint32(0, nb.length);
  p.set(nb, 4);
  v.setUint16(4 + nb.length, infos.length);
  infos.forEach((t, i) => v.setUint16(4 + nb.length + 2 + 2 * i, t));
  return p;
}

function metaPayload(name: string, queries: string[]): Uint8Array {
  const enc = new TextEncoder();
  const parts = [enc.encode(name), ...queries.map((q) => enc.encode(q))];
  const p = new Uint8Array(8 + parts.reduce((n, b) => n + 4 + b.length, 0) - 4 * 0);
  const v = new DataView(p.buffer);
  v.setUint32(0, parts[0].length);
  p.set(parts[0], 4);
  let at = 4 + parts[0].length;
  v.setUint32(at, queries.length);
  at += 4;
  for (const q of parts.slice(1)) {
    v.setUint32(at, q.length);
    p.set(q, at + 4);
    at += 4 + q.length;
  }
  return p.subarray(0, at);
}

Deno.test("NBD handshake: INFO, LIST, unknown and malformed options, meta contexts, ABORT", async () => {
  await withDaemon(async (_d, sock) => {
    const c = await RawNbdClient.open(sock);
    try {
      // INFO with every information type.
      await c.sendOption(
        NBD_OPT_INFO,
        infoPayload("rw", [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE]),
      );
      const seen = new Map<number, Uint8Array>();
      for (;;) {
        const r = (await c.readOptionReply())!;
        assert.equal(r.option, NBD_OPT_INFO);
        if (r.type === NBD_REP_ACK) break;
        assert.equal(r.type, NBD_REP_INFO);
        seen.set(new DataView(r.payload.buffer).getUint16(0), r.payload);
      }
      assert.equal(new TextDecoder().decode(seen.get(NBD_INFO_NAME)!.subarray(2)), "rw");
      assert.equal(
        new TextDecoder().decode(seen.get(NBD_INFO_DESCRIPTION)!.subarray(2)),
        "the rw disk",
      );
      const bs = new DataView(seen.get(NBD_INFO_BLOCK_SIZE)!.buffer);
      assert.equal(bs.getUint32(10), NBD_MAX_PAYLOAD);
      const ex = new DataView(seen.get(NBD_INFO_EXPORT)!.buffer);
      assert.equal(ex.getBigUint64(2), BigInt(SIZE));
      const flags = ex.getUint16(10);
      assert.equal(flags & NBD_FLAG_READ_ONLY, 0);
      assert(flags & NBD_FLAG_SEND_TRIM && flags & NBD_FLAG_SEND_WRITE_ZEROES);
      assert(flags & NBD_FLAG_CAN_MULTI_CONN);
      // INFO for an export that does not exist.
      await c.sendOption(NBD_OPT_INFO, infoPayload("nope", []));
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ERR_UNKNOWN);
      // INFO whose request count does not match its length.
      const bad = infoPayload("rw", [1, 2]);
      await c.sendOption(NBD_OPT_INFO, bad.subarray(0, bad.length - 2));
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ERR_INVALID);
      // LIST.
      await c.sendOption(NBD_OPT_LIST);
      const names: string[] = [];
      for (;;) {
        const r = (await c.readOptionReply())!;
        if (r.type === NBD_REP_ACK) break;
        assert.equal(r.type, NBD_REP_SERVER);
        const len = new DataView(r.payload.buffer).getUint32(0);
        names.push(new TextDecoder().decode(r.payload.subarray(4, 4 + len)));
      }
      assert.deepEqual(names.sort(), ["ro", "rw"]);
      await c.sendOption(NBD_OPT_LIST, new Uint8Array(3));
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ERR_INVALID);
      // Unknown and unsupported options.
      for (const opt of [99, NBD_OPT_STARTTLS, NBD_OPT_EXTENDED_HEADERS, 0xffffffff]) {
        await c.sendOption(opt, new Uint8Array(5));
        const r = (await c.readOptionReply())!;
        assert.equal(r.option, opt);
        assert.equal(r.type, NBD_REP_ERR_UNSUP);
      }
      // Meta contexts: SET needs structured replies first; base:allocation is offered.
      await c.sendOption(NBD_OPT_SET_META_CONTEXT, metaPayload("rw", ["base:allocation"]));
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ERR_INVALID);
      await c.sendOption(NBD_OPT_STRUCTURED_REPLY, new Uint8Array(1));
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ERR_INVALID);
      await c.sendOption(NBD_OPT_STRUCTURED_REPLY);
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ACK);
      await c.sendOption(NBD_OPT_STRUCTURED_REPLY);
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ERR_INVALID);
      const contexts = async () => {
        const names: string[] = [];
        for (;;) {
          const r = (await c.readOptionReply())!;
          if (r.type === NBD_REP_ACK) return names;
          assert.equal(r.type, NBD_REP_META_CONTEXT);
          assert.equal(new DataView(r.payload.buffer).getUint32(0), 1); // its id
          names.push(new TextDecoder().decode(r.payload.subarray(4)));
        }
      };
      await c.sendOption(NBD_OPT_LIST_META_CONTEXT, metaPayload("rw", []));
      assert.deepEqual(await contexts(), ["base:allocation"]);
      await c.sendOption(NBD_OPT_LIST_META_CONTEXT, metaPayload("rw", ["base:"]));
      assert.deepEqual(await contexts(), ["base:allocation"]);
      await c.sendOption(NBD_OPT_LIST_META_CONTEXT, metaPayload("rw", ["qemu:dirty-bitmap:"]));
      assert.deepEqual(await contexts(), []);
      await c.sendOption(NBD_OPT_SET_META_CONTEXT, metaPayload("rw", ["base:allocation"]));
      assert.deepEqual(await contexts(), ["base:allocation"]);
      await c.sendOption(NBD_OPT_SET_META_CONTEXT, metaPayload("rw", ["base:"]));
      assert.deepEqual(await contexts(), []);
      await c.sendOption(NBD_OPT_SET_META_CONTEXT, metaPayload("nope", []));
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ERR_UNKNOWN);
      const truncated = metaPayload("rw", ["base:allocation"]);
      await c.sendOption(NBD_OPT_SET_META_CONTEXT, truncated.subarray(0, truncated.length - 3));
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ERR_INVALID);
      // ABORT: acknowledged, then closed.
      await c.sendOption(NBD_OPT_ABORT);
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ACK);
      assert(await c.closedWithin());
    } finally {
      c.close();
    }
    await stillServing(sock);
  });
});

Deno.test("NBD handshake: EXPORT_NAME, with and without the 124 zero bytes", async () => {
  await withDaemon(async (_d, sock) => {
    for (const noZeroes of [true, false]) {
      const c = await RawNbdClient.open(sock, noZeroes ? 3 : 1);
      try {
        await c.sendOption(NBD_OPT_EXPORT_NAME, new TextEncoder().encode("ro"));
        const h = (await c.readExact(10 + (noZeroes ? 0 : 124)))!;
        const v = new DataView(h.buffer);
        assert.equal(v.getBigUint64(0), BigInt(SIZE));
        assert(v.getUint16(8) & NBD_FLAG_READ_ONLY);
        // Transmission with simple replies: a read of null-co's zeroes.
        await c.write(RawNbdClient.request(NBD_CMD_READ, { cookie: 5n, length: 4096 }));
        const r = (await c.readReply(4096))!;
        assert.equal(r.structured, false);
        assert.equal(r.error, 0);
        assert.equal(r.cookie, 5n);
        assert(r.payload.every((b) => b === 0));
      } finally {
        c.close();
      }
    }
    // An unknown name: EXPORT_NAME has no error reply, only closing.
    const c = await RawNbdClient.open(sock);
    await c.sendOption(NBD_OPT_EXPORT_NAME, new TextEncoder().encode("nope"));
    assert(await c.closedWithin());
    c.close();
  });
});

Deno.test("NBD handshake: hostile input closes the connection, never the daemon", async () => {
  await withDaemon(async (_d, sock) => {
    const closes = async (name: string, f: (c: RawNbdClient) => Promise<unknown>, flags = 3) => {
      const c = await RawNbdClient.open(sock, flags);
      try {
        await f(c);
        assert(await c.closedWithin(), name);
      } finally {
        c.close();
      }
    };
    await closes("unknown client flags", () => Promise.resolve(), 0x80000003);
    await closes("not fixed newstyle", () => Promise.resolve(), 0);
    await closes("bad option magic", (c) => c.write(new Uint8Array(16).fill(0x41)));
    await closes("a 1 GiB option", (c) => c.sendOption(NBD_OPT_LIST, new Uint8Array(8), 1 << 30));
    await closes("an option flood", async (c) => {
      const one = new Uint8Array(16);
      const v = new DataView(one.buffer);
      v.setBigUint64(0, 0x49484156454f5054n);
      v.setUint32(8, 99);
      const flood = new Uint8Array(16 * (NBD_MAX_OPTIONS + 50));
      for (let i = 0; i < NBD_MAX_OPTIONS + 50; i++) flood.set(one, 16 * i);
      await c.write(flood);
      let replies = 0;
      while ((await c.readOptionReply()) !== null) replies++;
      assert.equal(replies, NBD_MAX_OPTIONS);
    });
    // A client that sends half a header and goes away.
    const c = await RawNbdClient.open(sock);
    await c.write(new Uint8Array(7));
    c.close();
    await stillServing(sock);
  });
});

Deno.test("NBD transmission: the protocol's errors, and the connection survives them", async () => {
  await withDaemon(async (d, sock) => {
    const { client: c, size } = await RawNbdClient.go(sock, "rw");
    assert.equal(size, BigInt(SIZE));
    const expect = async (req: Uint8Array, error: number, type?: number, data?: Uint8Array) => {
      await c.write(data ? concat(req, data) : req);
      const r = (await c.readReply())!;
      assert.equal(r.cookie, new DataView(req.buffer).getBigUint64(8));
      assert.equal(r.error, error, `request type ${new DataView(req.buffer).getUint16(6)}`);
      assert.equal(r.flags & NBD_REPLY_FLAG_DONE, NBD_REPLY_FLAG_DONE);
      if (type !== undefined) assert.equal(r.type, type);
      return r;
    };
    const R = RawNbdClient.request;
    // Structured read: one OFFSET_DATA chunk with the offset.
    const r = await expect(
      R(NBD_CMD_READ, { cookie: 1n, offset: 512n, length: 4 }),
      0,
      NBD_REPLY_TYPE_OFFSET_DATA,
    );
    assert.equal(new DataView(r.payload.buffer).getBigUint64(0), 512n);
    assert.deepEqual([...r.payload.subarray(8)], [0x61, 0x61, 0x61, 0x61]);
    // Past the end (QEMU's errnos: ENOSPC for writes, EINVAL otherwise).
    await expect(
      R(NBD_CMD_READ, { cookie: 2n, offset: BigInt(SIZE - 2), length: 4 }),
      NBD_EINVAL,
      NBD_REPLY_TYPE_ERROR,
    );
    await expect(
      R(NBD_CMD_READ, { cookie: 3n, offset: 0xffffffffffffff00n, length: 512 }),
      NBD_EINVAL,
    );
    await expect(
      R(NBD_CMD_WRITE, { cookie: 4n, offset: BigInt(SIZE), length: 4 }),
      NBD_ENOSPC,
      undefined,
      new Uint8Array(4),
    );
    await expect(
      R(NBD_CMD_WRITE_ZEROES, { cookie: 5n, offset: BigInt(SIZE - 1), length: 2 }),
      NBD_ENOSPC,
    );
    await expect(R(NBD_CMD_TRIM, { cookie: 6n, offset: BigInt(SIZE), length: 1 }), NBD_EINVAL);
    await expect(R(NBD_CMD_CACHE, { cookie: 7n, offset: BigInt(SIZE), length: 1 }), NBD_EINVAL);
    // Over the payload limit (a read: no payload to skip, the connection stays).
    await expect(R(NBD_CMD_READ, { cookie: 8n, length: NBD_MAX_PAYLOAD + 1 }), NBD_EINVAL);
    // Unknown commands, BLOCK_STATUS without a meta context, bad flags, FAST_ZERO.
    await expect(R(42, { cookie: 9n }), NBD_EINVAL);
    await expect(R(NBD_CMD_BLOCK_STATUS, { cookie: 10n, length: 512 }), NBD_EINVAL);
    await expect(
      R(NBD_CMD_READ, { cookie: 11n, flags: NBD_CMD_FLAG_NO_HOLE, length: 512 }),
      NBD_EINVAL,
    );
    await expect(R(NBD_CMD_FLUSH, { cookie: 12n, flags: 0x8000 }), NBD_EINVAL);
    await expect(
      R(NBD_CMD_WRITE_ZEROES, { cookie: 13n, flags: NBD_CMD_FLAG_FAST_ZERO, length: 512 }),
      NBD_ENOTSUP,
    );
    // What works: FUA write, write-zeroes with NO_HOLE, trim, cache, flush.
    await expect(
      R(NBD_CMD_WRITE, { cookie: 20n, flags: NBD_CMD_FLAG_FUA, offset: 8192n, length: 3 }),
      0,
      NBD_REPLY_TYPE_NONE,
      new Uint8Array([1, 2, 3]),
    );
    await expect(
      R(NBD_CMD_WRITE_ZEROES, {
        cookie: 21n,
        flags: NBD_CMD_FLAG_NO_HOLE,
        offset: 16384n,
        length: 4096,
      }),
      0,
    );
    await expect(R(NBD_CMD_TRIM, { cookie: 22n, offset: 32768n, length: 4096 }), 0);
    await expect(R(NBD_CMD_CACHE, { cookie: 23n, length: 4096 }), 0);
    await expect(R(NBD_CMD_FLUSH, { cookie: 24n }), 0);
    const back = await expect(R(NBD_CMD_READ, { cookie: 25n, offset: 8190n, length: 6 }), 0);
    assert.deepEqual([...back.payload.subarray(8)], [0x61, 0x61, 1, 2, 3, 0x61]);
    // Bad request magic: the connection ends.
    await c.write(R(NBD_CMD_READ, { magic: 0x12345678, length: 512 }));
    assert(await c.closedWithin());
    c.close();
    // A write over the payload limit: an error, then the connection ends.
    const big = (await RawNbdClient.go(sock, "rw")).client;
    await big.write(R(NBD_CMD_WRITE, { cookie: 30n, length: NBD_MAX_PAYLOAD + 1 }));
    const e = (await big.readReply())!;
    assert.equal(e.error, NBD_EINVAL);
    assert(await big.closedWithin());
    big.close();
    // DISC: the server closes after the replies.
    const disc = (await RawNbdClient.go(sock, "rw")).client;
    await disc.write(concat(R(NBD_CMD_READ, { cookie: 40n, length: 8 }), R(NBD_CMD_DISC)));
    assert.equal((await disc.readReply())!.cookie, 40n);
    assert(await disc.closedWithin());
    disc.close();
    await stillServing(sock);
    const st = await d.nbdExports.get("rw")!.stats();
    assert(st.errors >= 12);
  });
});

Deno.test("NBD transmission: NBD_CMD_BLOCK_STATUS with base:allocation selected", async () => {
  await withDaemon(async (_d, sock) => {
    const c = await RawNbdClient.open(sock);
    try {
      await c.sendOption(NBD_OPT_STRUCTURED_REPLY);
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ACK);
      await c.sendOption(NBD_OPT_SET_META_CONTEXT, metaPayload("rw", ["base:allocation"]));
      assert.equal((await c.readOptionReply())!.type, NBD_REP_META_CONTEXT);
      assert.equal((await c.readOptionReply())!.type, NBD_REP_ACK);
      await c.sendOption(NBD_OPT_GO, infoPayload("rw", []));
      while ((await c.readOptionReply())!.type !== NBD_REP_ACK) { /* infos */ }
      const R = RawNbdClient.request;
      await c.write(R(NBD_CMD_BLOCK_STATUS, { cookie: 1n, offset: 4096n, length: 65536 }));
      const r = (await c.readReply())!;
      assert.equal(r.type, NBD_REPLY_TYPE_BLOCK_STATUS);
      assert.equal(r.flags, NBD_REPLY_FLAG_DONE);
      const v = new DataView(r.payload.buffer);
      assert.deepEqual([v.getUint32(0), v.getUint32(4), v.getUint32(8)], [1, 65536, 0]);
      for (
        const [cookie, req] of [
          [2n, R(NBD_CMD_BLOCK_STATUS, { cookie: 2n, offset: BigInt(SIZE), length: 1 })],
          [3n, R(NBD_CMD_BLOCK_STATUS, { cookie: 3n, length: 0 })],
          [4n, R(NBD_CMD_BLOCK_STATUS, { cookie: 4n, flags: NBD_CMD_FLAG_NO_HOLE, length: 1 })],
        ] as const
      ) {
        await c.write(req);
        const e = (await c.readReply())!;
        assert.equal(e.cookie, cookie);
        assert.equal(e.error, NBD_EINVAL);
      }
    } finally {
      c.close();
    }
  });
});

Deno.test("NBD transmission: a read-only export refuses writes with EPERM (simple replies)", async () => {
  await withDaemon(async (_d, sock) => {
    const { client: c, flags } = await RawNbdClient.go(sock, "ro", false);
    assert(flags & NBD_FLAG_READ_ONLY);
    const R = RawNbdClient.request;
    await c.write(concat(R(NBD_CMD_WRITE, { cookie: 1n, length: 4 }), new Uint8Array(4)));
    await c.write(R(NBD_CMD_TRIM, { cookie: 2n, length: 4 }));
    await c.write(R(NBD_CMD_WRITE_ZEROES, { cookie: 3n, length: 4 }));
    for (const cookie of [1n, 2n, 3n]) {
      const r = (await c.readReply())!;
      assert.equal(r.structured, false);
      assert.equal(r.cookie, cookie);
      assert.equal(r.error, NBD_EPERM);
    }
    // Reads still work after the refused write's payload was consumed.
    await c.write(R(NBD_CMD_READ, { cookie: 4n, length: 16 }));
    const r = (await c.readReply(16))!;
    assert.equal(r.error, 0);
    assert.equal(r.payload.length, 16);
    c.close();
  });
});

Deno.test("NBD transmission: many requests in flight, a client that does not read is backpressured", async () => {
  await withDaemon(async (d, sock) => {
    const { client: c } = await RawNbdClient.go(sock, "rw");
    const n = 4 * NBD_MAX_REQUESTS;
    const reqs: Uint8Array[] = [];
    for (let i = 0; i < n; i++) {
      reqs.push(
        RawNbdClient.request(NBD_CMD_READ, {
          cookie: BigInt(1000 + i),
          offset: BigInt((i % 16) * 65536),
          length: 65536,
        }),
      );
    }
    // Everything sent before a single reply is read: ~16 MiB of replies.
    await c.write(concat(...reqs));
    // The server stops reading this client instead of queueing without bound;
    // another client is served meanwhile.
    await stillServing(sock);
    const seen = new Set<bigint>();
    for (let i = 0; i < n; i++) {
      const r = (await c.readReply())!;
      assert.equal(r.error, 0);
      assert.equal(r.payload.length, 8 + 65536);
      seen.add(r.cookie);
    }
    assert.equal(seen.size, n);
    const st = await d.nbdExports.get("rw")!.stats();
    assert(st.readPauses > 0, "reading paused at least once");
    c.close();
  });
});

Deno.test("NBD transmission: payload bytes in flight are bounded, not only the request count", async () => {
  await withDaemon(async (d, sock) => {
    const { client: c } = await RawNbdClient.go(sock, "ro");
    // Eight 32 MiB reads (256 MiB of replies) sent at once, no reply read yet.
    const reqs: Uint8Array[] = [];
    for (let i = 0; i < 8; i++) {
      reqs.push(RawNbdClient.request(NBD_CMD_READ, { cookie: BigInt(i), length: NBD_MAX_PAYLOAD }));
    }
    await c.write(concat(...reqs));
    await new Promise((r) => setTimeout(r, 300));
    const st = await d.nbdExports.get("ro")!.stats();
    // 64 MiB of buffers, then one more request at most: reading stopped.
    assert(st.requests <= 3, `${st.requests} requests taken in`);
    assert(st.readPauses >= 1);
    for (let i = 0; i < 8; i++) {
      const r = (await c.readReply())!;
      assert.equal(r.error, 0);
      assert.equal(r.payload.length, 8 + NBD_MAX_PAYLOAD);
    }
    c.close();
  }, 64 << 20);
});

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
