// The NBD export under arbitrary input (fast-check): random option streams
// during the handshake and random transmission requests against a live
// export over a Unix socket. Every reply the server sends is well formed
// (magic, a cookie that was sent, answered once, an NBD error value), the
// server closes each connection once its client has gone, and the daemon
// keeps serving other clients throughout.
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  IHAVEOPT,
  NBD_CMD_DISC,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_REPLY_FLAG_DONE,
  NBD_REQUEST_MAGIC,
} from "../../../block/mod.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { NBD_MAX_PAYLOAD } from "../../../dataplane/nbd/nbd_session.ts";
import { makeScratchDir } from "../../harness/mod.ts";
import { RawNbdClient } from "./nbd_raw_client.ts";

const SIZE = 1 << 20;
const NBD_ERRORS = new Set([
  NBD_EPERM,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EOVERFLOW,
  NBD_ENOTSUP,
  NBD_ESHUTDOWN,
]);

async function withDaemon(fn: (d: StorageDaemon, sock: string) => Promise<void>) {
  const dir = await makeScratchDir("nbd-fuzz");
  const d = new StorageDaemon();
  try {
    const sock = `${dir}/nbd.sock`;
    await d.nbdServerStart({ addr: { type: "unix", path: sock }, maxConnections: 0 });
    d.blockdevAdd({ driver: "null-co", "node-name": "rw", size: String(SIZE) }, true);
    await d.nbdExportAdd({ id: "rw", nodeName: "rw", name: "rw", description: "", writable: true });
    await fn(d, sock);
  } finally {
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

async function stillServing(sock: string): Promise<void> {
  const { client } = await RawNbdClient.go(sock, "rw");
  try {
    await client.write(RawNbdClient.request(NBD_CMD_READ, { cookie: 9n, length: 512 }));
    const r = await client.readReply();
    assert.equal(r?.error, 0);
    assert.equal(r?.cookie, 9n);
  } finally {
    client.close();
  }
}

async function waitNoConnections(d: StorageDaemon): Promise<void> {
  const until = Date.now() + 5000;
  while (d.nbdServer!.connections > 0) {
    if (Date.now() > until) throw new Error(`${d.nbdServer!.connections} connections left`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** An option frame: a header (maybe lying about its length) and a payload. */
const optionFrame = fc.record({
  option: fc.oneof(fc.integer({ min: 0, max: 12 }), fc.nat({ max: 0xffffffff })),
  payload: fc.oneof(
    fc.uint8Array({ maxLength: 48 }),
    // A well-formed INFO/GO/meta-context name part for the real export.
    fc.constant(new Uint8Array([0, 0, 0, 2, 0x72, 0x77, 0, 0])),
  ),
  lie: fc.oneof(fc.constant(0), fc.integer({ min: -8, max: 8 }), fc.constant(1 << 30)),
  magic: fc.oneof({ weight: 9, arbitrary: fc.constant(IHAVEOPT) }, {
    weight: 1,
    arbitrary: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
  }),
}).map(({ option, payload, lie, magic }) => {
  const b = new Uint8Array(16 + payload.length);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, magic);
  v.setUint32(8, option);
  v.setUint32(12, Math.max(0, payload.length + lie) >>> 0);
  b.set(payload, 16);
  return { bytes: b, option };
});

const handshakeInput = fc.record({
  clientFlags: fc.oneof(
    { weight: 8, arbitrary: fc.constant(3) },
    { weight: 1, arbitrary: fc.constant(1) },
    { weight: 1, arbitrary: fc.nat({ max: 0xffffffff }) },
  ),
  frames: fc.array(
    fc.oneof(
      { weight: 4, arbitrary: optionFrame },
      {
        weight: 1,
        arbitrary: fc.uint8Array({ maxLength: 40 }).map((b) => ({ bytes: b, option: -1 })),
      },
    ),
    { maxLength: 12 },
  ),
  chunk: fc.integer({ min: 1, max: 64 }),
});

Deno.test("NBD handshake (fast-check): any option stream; well-formed replies; the daemon serves on", async () => {
  await withDaemon(async (d, sock) => {
    await fc.assert(
      fc.asyncProperty(handshakeInput, async ({ clientFlags, frames, chunk }) => {
        const c = await RawNbdClient.open(sock, clientFlags);
        try {
          const bytes = concat(frames.map((f) => f.bytes));
          for (let at = 0; at < bytes.length; at += chunk) {
            if (!await c.write(bytes.subarray(at, at + chunk))) break;
          }
          await c.closeWrite();
          const mayEnterTransmission = frames.some((f) =>
            f.option === NBD_OPT_GO || f.option === NBD_OPT_EXPORT_NAME
          );
          // Every option reply is well formed (until a GO may have succeeded:
          // then transmission replies may follow)...
          if (!mayEnterTransmission && clientFlags === 3) {
            while ((await c.readOptionReply(5000)) !== null) { /* checked by the reader */ }
          }
          // ...and the server closes once the client has gone.
          assert(await c.closedWithin(5000), "the server did not close the connection");
        } finally {
          c.close();
        }
      }),
      { numRuns: 300 },
    );
    await waitNoConnections(d);
    await stillServing(sock);
  });
});

const request = fc.record({
  type: fc.oneof({ weight: 6, arbitrary: fc.integer({ min: 0, max: 7 }) }, {
    weight: 1,
    arbitrary: fc.nat({ max: 0xffff }),
  }),
  flags: fc.oneof(
    { weight: 4, arbitrary: fc.constant(0) },
    { weight: 2, arbitrary: fc.integer({ min: 0, max: 31 }) },
    { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
  ),
  offset: fc.oneof(
    fc.bigInt({ min: 0n, max: BigInt(SIZE) }),
    fc.constantFrom(0n, BigInt(SIZE - 512), BigInt(SIZE), (1n << 64n) - 1n, 1n << 63n),
  ),
  length: fc.oneof(
    fc.integer({ min: 0, max: 4096 }),
    fc.constantFrom(0, 512, NBD_MAX_PAYLOAD, NBD_MAX_PAYLOAD + 1, 0xffffffff),
  ),
  badMagic: fc.oneof({ weight: 30, arbitrary: fc.constant(false) }, {
    weight: 1,
    arbitrary: fc.constant(true),
  }),
});

Deno.test("NBD transmission (fast-check): any request stream; every reply well formed, once", async () => {
  await withDaemon(async (d, sock) => {
    await fc.assert(
      fc.asyncProperty(
        fc.boolean(),
        fc.boolean(),
        fc.array(request, { minLength: 1, maxLength: 16 }),
        fc.integer({ min: 1, max: 100 }),
        async (structured, baseAllocation, reqs, chunk) => {
          const { client: c } = await RawNbdClient.go(sock, "rw", structured, baseAllocation);
          const lengths = new Map<bigint, { type: number; length: number }>();
          try {
            const parts: Uint8Array[] = [];
            let cookie = 1n;
            for (const r of reqs) {
              const cur = cookie++;
              parts.push(RawNbdClient.request(r.type, {
                cookie: cur,
                flags: r.flags,
                offset: r.offset,
                length: r.length,
                magic: r.badMagic ? 0xdeadbeef : NBD_REQUEST_MAGIC,
              }));
              lengths.set(cur, r);
              // A write's payload goes with it when it is small; a big one never
              // comes (the server waits for it, then sees the end of the stream).
              if (r.type === NBD_CMD_WRITE && r.length <= 4096) {
                parts.push(new Uint8Array(r.length).fill(0x5a));
              }
              if (r.badMagic || (r.type === NBD_CMD_WRITE && r.length > 4096)) break;
              if (r.type === NBD_CMD_DISC) break; // no reply, nothing after it is read
            }
            // In random pieces: headers and payloads split across reads.
            const bytes = concat(parts);
            for (let at = 0; at < bytes.length; at += chunk) {
              if (!await c.write(bytes.subarray(at, at + chunk))) break;
            }
            await c.closeWrite();
            const answered = new Set<bigint>();
            // A simple reply to a READ carries the request's length of data.
            const dataLength = (ck: bigint) => {
              const r = lengths.get(ck);
              return r?.type === NBD_CMD_READ ? r.length : 0;
            };
            // Replies until the server closes (it must: the client has gone).
            for (;;) {
              const reply = await c.readReply(dataLength, 5000);
              if (reply === null) break;
              assert(lengths.has(reply.cookie), `unknown cookie ${reply.cookie}`);
              assert(!answered.has(reply.cookie), `cookie ${reply.cookie} answered twice`);
              answered.add(reply.cookie);
              if (reply.error !== 0) assert(NBD_ERRORS.has(reply.error), `error ${reply.error}`);
              if (reply.structured) {
                assert.equal(reply.flags & NBD_REPLY_FLAG_DONE, NBD_REPLY_FLAG_DONE);
              }
            }
            // Without a bad magic or a write cut short, every request was answered.
            const cut = reqs.some((r) =>
              r.badMagic || (r.type === NBD_CMD_WRITE && r.length > 4096)
            );
            const disc = [...lengths.values()].some((r) => r.type === NBD_CMD_DISC);
            if (!cut) assert.equal(answered.size, lengths.size - (disc ? 1 : 0));
          } finally {
            c.close();
          }
        },
      ),
      { numRuns: 300 },
    );
    await waitNoConnections(d);
    await stillServing(sock);
  });
});
