/**
 * The nbd driver's commands against real servers: nbdkit's memory plugin
 * over loopback TCP (WRITE, WRITE_ZEROES with and without NO_HOLE, TRIM,
 * FLUSH, FUA), the error filter (errors travel back as -errno and the
 * connection stays usable), the delay filter (many slow requests in flight)
 * and qemu-nbd over a sparse file (structured reads made of data and hole
 * chunks).
 */
import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import { IoVector, NbdError } from "../../../block/mod.ts";
import { NbdDriver } from "../../../block/nbd/mod.ts";
import { EIO, ENOSPC, EPERM, EROFS } from "../../../sys/mod.ts";
import { fillPattern, runUntil } from "../helpers.ts";
import { freePort, have, type NbdServer, startNbdkit, startQemuNbd } from "./nbd_servers.ts";

const MiB = 1 << 20;
const noNbdkit = !have("nbdkit");
const noQemuNbd = !have("qemu-nbd");
if (noNbdkit) console.warn("SKIP nbdkit tests: nbdkit is not installed (tools/setup.sh --test)");
if (noQemuNbd) console.warn("SKIP qemu-nbd tests: qemu-nbd is not installed (qemu-utils)");

function io(run: (cb: (ret: number) => void) => void): Promise<number> {
  return new Promise((resolve) => run(resolve));
}

async function withServer(
  start: (dir: string) => Promise<NbdServer>,
  body: (ctx: AioContext, srv: NbdServer, dir: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir();
  const ctx = new AioContext();
  let srv: NbdServer | null = null;
  try {
    srv = await start(dir);
    await body(ctx, srv, dir);
  } finally {
    ctx.close();
    await srv?.kill();
    await Deno.remove(dir, { recursive: true });
  }
}

function tcp(srv: NbdServer) {
  return { type: "inet" as const, host: "127.0.0.1", port: srv.port! };
}

Deno.test({
  name: "nbd: nbdkit memory over TCP: write, write-zeroes (NO_HOLE and not), trim, flush, FUA",
  ignore: noNbdkit,
  async fn() {
    await withServer(
      () => startNbdkit({ port: freePort() }, ["memory", "size=8M"]),
      async (ctx, srv) => {
        const d = await runUntil(ctx, NbdDriver.open(ctx, { server: tcp(srv) }));
        assert.equal(d.length, 8 * MiB);
        const model = new Uint8Array(8 * MiB);
        const w = fillPattern(new Uint8Array(2 * MiB), 5);
        assert.equal(
          await runUntil(ctx, io((cb) => d.pwritev(0, IoVector.fromBuffers([w]), cb))),
          0,
        );
        model.set(w, 0);
        assert.equal(await runUntil(ctx, io((cb) => d.pwriteZeroes(4097, 65536, false, cb))), 0);
        model.fill(0, 4097, 4097 + 65536);
        assert.equal(await runUntil(ctx, io((cb) => d.pwriteZeroes(MiB, 8192, true, cb))), 0);
        model.fill(0, MiB, MiB + 8192);
        // The memory plugin deallocates on trim: trimmed bytes read as zeroes.
        assert.equal(await runUntil(ctx, io((cb) => d.pdiscard(512 * 1024, 131072, cb))), 0);
        model.fill(0, 512 * 1024, 640 * 1024);
        const f = fillPattern(new Uint8Array(4096), 8);
        assert.equal(
          await runUntil(
            ctx,
            io((cb) => d.pwritevFlags(3 * MiB, IoVector.fromBuffers([f]), true, cb)),
          ),
          0,
        );
        model.set(f, 3 * MiB);
        assert.equal(await runUntil(ctx, io((cb) => d.flush(cb))), 0);
        const r = new Uint8Array(4 * MiB).fill(0xee);
        assert.equal(
          await runUntil(ctx, io((cb) => d.preadv(0, IoVector.fromBuffers([r]), cb))),
          0,
        );
        assert.deepEqual(r, model.subarray(0, 4 * MiB));
        await d.close();
      },
    );
  },
});

Deno.test({
  name: "nbd: nbdkit error filter: server errors come back as -errno, the connection stays",
  ignore: noNbdkit,
  async fn() {
    await withServer(
      (dir) =>
        startNbdkit({ socket: `${dir}/s` }, [
          "--filter=error",
          "memory",
          "size=1M",
          "error-pwrite=ENOSPC",
          "error-pwrite-rate=100%",
          "error-trim=EPERM",
          "error-trim-rate=100%",
        ]),
      async (ctx, srv) => {
        const d = await runUntil(
          ctx,
          NbdDriver.open(ctx, { server: { type: "unix", path: srv.socket! } }),
        );
        const b = new Uint8Array(4096);
        const q = IoVector.fromBuffers([b]);
        assert.equal(await runUntil(ctx, io((cb) => d.pwritev(0, q, cb))), -ENOSPC);
        assert.equal(await runUntil(ctx, io((cb) => d.pdiscard(0, 4096, cb))), -EPERM);
        assert.equal(await runUntil(ctx, io((cb) => d.preadv(0, q, cb))), 0);
        assert.equal(d.client.state, "connected");
        assert.equal(d.client.reconnects, 0);
        await d.close();
      },
    );
  },
});

Deno.test({
  name: "nbd: nbdkit delay filter: 48 slow reads in flight at once all complete with the data",
  ignore: noNbdkit,
  async fn() {
    await withServer(
      (dir) =>
        startNbdkit({ socket: `${dir}/s` }, [
          "--filter=delay",
          "--threads=64",
          "memory",
          "size=4M",
          "rdelay=20ms",
        ]),
      async (ctx, srv) => {
        const d = await runUntil(
          ctx,
          NbdDriver.open(ctx, { server: { type: "unix", path: srv.socket! } }),
        );
        const img = fillPattern(new Uint8Array(4 * MiB), 2);
        assert.equal(
          await runUntil(ctx, io((cb) => d.pwritev(0, IoVector.fromBuffers([img]), cb))),
          0,
        );
        const bufs = Array.from({ length: 48 }, () => new Uint8Array(4096));
        const rets = await runUntil(
          ctx,
          Promise.all(
            bufs.map((b, i) =>
              io((cb) => d.preadv((i * 77777) % (4 * MiB - 4096), IoVector.fromBuffers([b]), cb))
            ),
          ),
        );
        assert.deepEqual(rets, bufs.map(() => 0));
        bufs.forEach((b, i) => {
          const off = (i * 77777) % (4 * MiB - 4096);
          assert.deepEqual(b, img.subarray(off, off + 4096));
        });
        await d.close();
      },
    );
  },
});

Deno.test({
  name: "nbd: qemu-nbd on a sparse file: a read is data and hole chunks, holes read as zeroes",
  ignore: noQemuNbd,
  async fn() {
    await withServer(
      async (dir) => {
        const file = `${dir}/sparse.img`;
        const f = await Deno.open(file, { create: true, write: true });
        await f.truncate(16 * MiB);
        await f.seek(MiB, Deno.SeekMode.Start);
        await f.write(fillPattern(new Uint8Array(65536), 4));
        f.close();
        return startQemuNbd(file, { socket: `${dir}/s` });
      },
      async (ctx, srv) => {
        const d = await runUntil(
          ctx,
          NbdDriver.open(ctx, { server: { type: "unix", path: srv.socket! }, exportName: "disk" }),
        );
        const r = new Uint8Array(4 * MiB).fill(0xff);
        assert.equal(
          await runUntil(ctx, io((cb) => d.preadv(0, IoVector.fromBuffers([r]), cb))),
          0,
        );
        const want = new Uint8Array(4 * MiB);
        want.set(fillPattern(new Uint8Array(65536), 4), MiB);
        assert.deepEqual(r, want);
        assert.ok(d.client.holeChunks > 0, "qemu-nbd sent NBD_REPLY_TYPE_OFFSET_HOLE chunks");
        assert.ok(d.client.dataChunks > 0);
        await d.close();
      },
    );
  },
});

Deno.test({
  name: "nbd: a read-only export refuses writes with EROFS; an unknown export is refused at open",
  ignore: noQemuNbd,
  async fn() {
    await withServer(
      async (dir) => {
        await Deno.writeFile(`${dir}/d.img`, new Uint8Array(MiB));
        return startQemuNbd(`${dir}/d.img`, { socket: `${dir}/s` }, { readOnly: true });
      },
      async (ctx, srv) => {
        const server = { type: "unix" as const, path: srv.socket! };
        const d = await runUntil(ctx, NbdDriver.open(ctx, { server, exportName: "disk" }));
        assert.equal(d.readOnly, true);
        const q = IoVector.fromBuffers([new Uint8Array(512)]);
        assert.equal(await runUntil(ctx, io((cb) => d.pwritev(0, q, cb))), -EROFS);
        assert.equal(await runUntil(ctx, io((cb) => d.preadv(0, q, cb))), 0);
        await d.close();
        await assert.rejects(
          runUntil(ctx, NbdDriver.open(ctx, { server, exportName: "nope" })),
          (e) => e instanceof NbdError && e.kind === "refused",
        );
        void EIO;
      },
    );
  },
});

Deno.test({
  name: "nbd: TCP by name (localhost, getaddrinfo) and over IPv6 loopback (::1)",
  ignore: noNbdkit,
  async fn() {
    for (const [listen, host] of [["127.0.0.1", "localhost"], ["::1", "::1"]]) {
      await withServer(
        () => startNbdkit({ port: freePort(), host: listen }, ["memory", "size=1M"]),
        async (ctx, srv) => {
          const d = await runUntil(
            ctx,
            NbdDriver.open(ctx, { server: { type: "inet", host, port: srv.port! } }),
          );
          const w = fillPattern(new Uint8Array(8192), 11), r = new Uint8Array(8192);
          assert.equal(
            await runUntil(ctx, io((cb) => d.pwritev(4096, IoVector.fromBuffers([w]), cb))),
            0,
          );
          assert.equal(
            await runUntil(ctx, io((cb) => d.preadv(4096, IoVector.fromBuffers([r]), cb))),
            0,
          );
          assert.deepEqual(r, w);
          await d.close();
        },
      );
    }
  },
});
