/**
 * A server that breaks the protocol is untrusted input: the connection is
 * dropped (the request fails with EIO when reconnect-delay is 0), the
 * reason is recorded, and nothing throws or crashes. Includes a fuzz test:
 * any bytes as a reply.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { AioContext } from "../../../aio/mod.ts";
import {
  encodeNbdSimpleReply,
  encodeNbdStructuredReplyHeader,
  IoVector,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NbdError,
  type NbdRequest,
} from "../../../block/mod.ts";
import { NbdDriver } from "../../../block/nbd/mod.ts";
import { EIO, SysError } from "../../../sys/mod.ts";
import { runUntil } from "../helpers.ts";
import { fakeNbdServer, type FakeReply } from "./fake_nbd_server.ts";

function chunk(req: NbdRequest, type: number, flags: number, payload: Uint8Array): Uint8Array {
  const b = new Uint8Array(20 + payload.length);
  encodeNbdStructuredReplyHeader(b, 0, {
    flags,
    type,
    cookie: req.cookie,
    length: payload.length,
  });
  b.set(payload, 20);
  return b;
}

function be64(n: bigint, extra = 0): Uint8Array {
  const b = new Uint8Array(8 + extra);
  new DataView(b.buffer).setBigUint64(0, n);
  return b;
}

const BAD: Record<string, FakeReply> = {
  "unknown cookie": async (req, send) => {
    const b = new Uint8Array(16);
    encodeNbdSimpleReply(b, 0, { error: 0, cookie: req.cookie + 1000n });
    await send(b);
  },
  "bad magic": (_req, send) => send(new Uint8Array(20).fill(0x42)),
  "data chunk past the request": (req, send) =>
    send(chunk(req, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_FLAG_DONE, be64(req.offset + 1n, 4096))),
  "hole past the request": (req, send) => {
    const p = be64(req.offset, 4);
    new DataView(p.buffer).setUint32(8, req.length + 1);
    return send(chunk(req, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REPLY_FLAG_DONE, p));
  },
  "huge error chunk": (req, send) => {
    const b = new Uint8Array(20);
    encodeNbdStructuredReplyHeader(b, 0, {
      flags: NBD_REPLY_FLAG_DONE,
      type: NBD_REPLY_TYPE_ERROR,
      cookie: req.cookie,
      length: 0x7fffffff,
    });
    return send(b);
  },
  "NONE without DONE": (req, send) => send(chunk(req, NBD_REPLY_TYPE_NONE, 0, new Uint8Array(0))),
  "simple reply with data to a structured read": async (req, send) => {
    const b = new Uint8Array(16 + req.length);
    encodeNbdSimpleReply(b, 0, { error: 0, cookie: req.cookie });
    await send(b);
  },
  "error chunk with error 0": (req, send) =>
    send(chunk(req, NBD_REPLY_TYPE_ERROR, NBD_REPLY_FLAG_DONE, new Uint8Array(6))),
};

for (const [what, reply] of Object.entries(BAD)) {
  Deno.test(`nbd: bad server (${what}): the connection drops, the read fails with EIO`, async () => {
    const dir = await Deno.makeTempDir();
    const srv = fakeNbdServer(`${dir}/s`, reply);
    const ctx = new AioContext();
    try {
      const d = await runUntil(
        ctx,
        NbdDriver.open(ctx, { server: { type: "unix", path: `${dir}/s` } }),
      );
      const q = IoVector.fromBuffers([new Uint8Array(4096)]);
      const ret = await runUntil(ctx, new Promise<number>((r) => d.preadv(8192, q, r)));
      assert.equal(ret, -EIO);
      assert.ok(d.client.lastError instanceof NbdError, String(d.client.lastError));
      assert.equal((d.client.lastError as NbdError).kind, "protocol");
      assert.equal(d.client.state, "connecting-nowait");
      await d.close();
    } finally {
      ctx.close();
      await srv.close();
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("nbd: a server with a bad greeting is refused at open with a protocol error", async () => {
  const dir = await Deno.makeTempDir();
  const srv = fakeNbdServer(`${dir}/s`, () => Promise.resolve(), {
    greeting: new Uint8Array(18).fill(7),
  });
  const ctx = new AioContext();
  try {
    await assert.rejects(
      runUntil(ctx, NbdDriver.open(ctx, { server: { type: "unix", path: `${dir}/s` } })),
      (e) => e instanceof NbdError && e.kind === "protocol",
    );
  } finally {
    ctx.close();
    await srv.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("nbd: fuzz: any bytes as a reply complete the read (0 or -errno), never throw", async () => {
  const dir = await Deno.makeTempDir();
  let script: Uint8Array[] = [];
  const srv = fakeNbdServer(`${dir}/s`, async (req, send) => {
    for (const part of script) {
      // Patch the real cookie into a plausible header half of the time.
      if (part.length >= 16 && part[0] === 0x67) {
        new DataView(part.buffer).setBigUint64(8, req.cookie);
      }
      await send(part);
    }
  });
  const ctx = new AioContext();
  try {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.oneof(
            fc.uint8Array({ minLength: 1, maxLength: 64 }),
            fc.constant(
              Uint8Array.from([0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ),
            fc.constant(Uint8Array.from([0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1])),
          ),
          { maxLength: 6 },
        ),
        async (parts) => {
          script = parts.map((p) => p.slice());
          const d = await runUntil(
            ctx,
            NbdDriver.open(ctx, { server: { type: "unix", path: `${dir}/s` } }),
          );
          const q = IoVector.fromBuffers([new Uint8Array(512)]);
          const p = new Promise<number>((r) => d.preadv(0, q, r));
          // Give the server time to answer, then drop the connection if it did not.
          const timer = setTimeout(() => d.client.breakConnection(), 50);
          const ret = await runUntil(ctx, p);
          clearTimeout(timer);
          assert.ok(ret <= 0);
          await d.close();
        },
      ),
      { numRuns: 40 },
    );
  } finally {
    ctx.close();
    await srv.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("nbd: fuzz: any option replies make the open fail with a typed error, never hang", async () => {
  const dir = await Deno.makeTempDir();
  let bytes = new Uint8Array(0);
  const srv = fakeNbdServer(`${dir}/s`, () => Promise.resolve(), { afterFlags: () => bytes });
  const ctx = new AioContext();
  // A plausible reply header start (NBD_REP_MAGIC, option 8) so the fuzz reaches deeper checks.
  const header = Uint8Array.from([0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 8]);
  try {
    await fc.assert(
      fc.asyncProperty(
        fc.boolean(),
        fc.uint8Array({ maxLength: 96 }),
        async (plausible, tail) => {
          bytes = plausible ? Uint8Array.from([...header, ...tail]) : tail;
          await assert.rejects(
            runUntil(
              ctx,
              NbdDriver.open(ctx, {
                server: { type: "unix", path: `${dir}/s` },
                connectTimeout: 5,
              }),
            ),
            (e) => e instanceof NbdError || e instanceof SysError,
          );
        },
      ),
      { numRuns: 60 },
    );
  } finally {
    ctx.close();
    await srv.close();
    await Deno.remove(dir, { recursive: true });
  }
});
